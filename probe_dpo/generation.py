"""One way to sample continuations: ``generate(model, prompts, k, settings, seed)``.

Used by the testbed build (its probe data and held-out generations), the K-candidate
sampling of DPO rounds, and every evaluation, so a change of sampling is made once and all
of them stay comparable. The settings are the testbed's: raw-text continuation of string
prompts; a conversational prompt (a list of role/content messages, TRL's format) goes through
the tokenizer's chat template with the generation prompt (``probe_dpo.chat``); prompts cut on the left to ``max_prompt_tokens``, top-k/top-p sampling.

Reproducible by construction: prompts are sorted by token length into batches (less
padding; ties by input order), left-padded, and each batch is seeded from
``(seed, seed_tag, "batch", index)``, so the same model, prompts, settings and seed give the
same continuations, whichever process runs them.

The backend is Hugging Face ``generate``, in float32 or under bfloat16 autocast
(``GenerationSettings.dtype``). vLLM is not offered: ``vllm==0.32`` (the last
release on torch 2.13) needs ``transformers<5.20`` and this project pins 5.23 (see the
closing notes of issue 16 for the measured trade-off on CPU).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from probe_dpo.config import bounded
from probe_dpo.errors import UserError
from probe_dpo.stats import stable_seed


@dataclass
class GenerationSettings:
    """How continuations are sampled (raw text continuation, no chat template)."""

    max_new_tokens: int = bounded(20, ge=1, le=512)
    """Tokens sampled per continuation."""
    temperature: float = bounded(1.0, gt=0.0, le=5.0)
    """Softmax temperature."""
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = bounded(50, ge=0)
    """0 turns top-k filtering off."""
    batch_size: int = bounded(64, ge=1, le=4096)
    """Sequences per forward pass (prompts per batch = batch_size // samples per prompt)."""
    max_prompt_tokens: int = bounded(64, ge=4, le=4096)
    """Longer prompts keep their last tokens (the end is where the continuation starts)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Matmul precision of sampling: bfloat16 runs under autocast (the float32 weights are
    kept); auto: bfloat16 on a GPU or a CPU with native bfloat16, else float32
    (``probe_dpo.precision``). Every sampler of a testbed uses its setting, so the base
    model's and each policy's continuations are sampled alike."""

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with ``changes`` (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prompt_texts(prompts: Sequence[Any]) -> list[Any]:
    """Prompts (strings, or message lists: TRL's conversational format) from a list of them or of
    records with a ``prompt`` field."""
    from probe_dpo.data import is_messages

    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                raise UserError(f"prompt record {i + 1} has no 'prompt' field")
            p = p["prompt"]
        if not (isinstance(p, str) or is_messages(p)):
            raise UserError(f"prompt {i + 1} is not a string or a list of role/content messages ({type(p).__name__})")
        out.append(p)
    return out


def device_of(model: Any) -> Any:
    """The device of a module's first parameter (CPU for a module without any)."""
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generate(model: Any, prompts: Sequence[Any], k: int = 1, settings: GenerationSettings | None = None,
             seed: Any = 0, *, tokenizer: Any, seed_tag: Any = "", desc: str = "generating",
             progress: bool = True) -> list[list[str]]:
    """``k`` sampled continuations of each prompt, in prompt order (``[prompts][k]`` strings)."""
    import torch
    from tqdm.auto import tqdm

    from probe_dpo.precision import autocast

    if k < 1:
        raise UserError(f"samples per prompt must be >= 1, got {k}")
    from probe_dpo.chat import render_prompts

    texts, special = render_prompts(tokenizer, prompt_texts(prompts))  # message lists: the chat template
    if not texts:
        return []
    settings = settings or GenerationSettings()
    tok = tokenizer
    tok.padding_side = "left"
    tok.truncation_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = device_of(model)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=special, truncation=True,
                                       max_length=settings.max_prompt_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    per_batch = max(1, settings.batch_size // k)
    out: list[list[str] | None] = [None] * len(texts)
    kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                  max_new_tokens=settings.max_new_tokens, num_return_sequences=k, pad_token_id=tok.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(settings.dtype, device), \
                tqdm(total=len(texts), desc=desc, unit="prompt", file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
                     disable=not progress) as bar:
            for b, start in enumerate(range(0, len(order), per_batch)):
                idx = order[start:start + per_batch]
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=settings.max_prompt_tokens, add_special_tokens=special).to(device)
                torch.manual_seed(stable_seed(seed, seed_tag, "batch", b))
                ids = model.generate(**enc, **kwargs)
                new = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for row, i in enumerate(idx):
                    out[i] = new[row * k:(row + 1) * k]
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return [o if o is not None else [""] * k for o in out]
