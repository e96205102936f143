"""Extracting pooled hidden states: in-process (``extract``) or sharded over Ray actors.

Inputs are either plain ``texts`` or ``prompts`` + ``completions``, in TRL's standard format
(strings) or its conversational one (message lists, rendered with the tokenizer's chat
template: ``probe_dpo.chat``). For prompt + completion the
prompt and the completion are tokenized separately and concatenated (prompt with the
tokenizer's special tokens, completion without), which is the token sequence the model
saw when it generated the completion; the *response span* is the completion's tokens.

Pooling (per layer, all requested layers in ONE forward pass):
- ``mean``: mean over the span's tokens (padding never counts),
- ``last``: the last real token,
- ``none``: the span's per-token states (a list of ``[tokens, hidden]`` tensors).

``span="response"`` (the default when completions are given, and what probes are trained
on) pools over the completion's tokens only; ``span="all"`` over every token. A completion
with no tokens (the model stopped at once) falls back to the last prompt token, the state
that produced the stop; ``stats["empty_spans"]`` counts them.

Inputs are sorted by length into batches (less padding) and returned in input order.
Padding is on the right, so positions and causal attention of real tokens are unchanged.
By default the forward pass stops after the deepest requested layer.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal, Sequence

import torch

from probe_dpo.chat import render_pair, render_text
from probe_dpo.data import is_messages
from probe_dpo.errors import UserError

Pooling = Literal["mean", "last", "none"]


Span = Literal["response", "all"]


POOLINGS = ("mean", "last", "none")


SPANS = ("response", "all")


Features = dict[int, Any]  # layer -> Tensor [n, hidden] (mean/last) or list of [tokens, hidden] (none)


def check_inputs(texts, prompts, completions, span) -> tuple[str, int]:
    if texts is not None and (prompts is not None or completions is not None):
        raise UserError("give either texts or prompts + completions, not both")
    if texts is None:
        if prompts is None or completions is None:
            raise UserError("give texts, or both prompts and completions")
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        span = span or "response"
    else:
        n = len(texts)
        span = span or "all"
        if span == "response":
            raise UserError("span 'response' needs prompts and completions (columns prompt and completion), "
                            "not plain texts")
    if span not in SPANS:
        raise UserError(f"unknown span {span!r}: use one of {', '.join(SPANS)}")
    return span, n


def tokenize(tokenizer, texts: Sequence[str] | None = None, *, prompts: Sequence[str] | None = None,
             completions: Sequence[str] | None = None, span: str | None = None,
             max_length: int = 512) -> list[tuple[list[int], int]]:
    """Token ids and the start of the pooled span for each input: ``[(ids, span_start)]``.

    Plain texts keep their first ``max_length`` tokens. Prompt + completion pairs keep
    their last ``max_length`` tokens (the completion matters most); the span start moves
    with the cut.
    """
    span, _ = check_inputs(texts, prompts, completions, span)
    if max_length < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}")
    if texts is not None:
        ids = _encode(tokenizer, [render_text(tokenizer, t) for t in texts])
        out = []
        for row in ids:
            row = list(row[:max_length]) or _fallback_ids(tokenizer)
            out.append((row, 0))
        return out
    if any(map(is_messages, prompts)) or any(map(is_messages, completions)):  # through the chat template
        rendered = [render_pair(tokenizer, p, c) for p, c in zip(prompts, completions)]
        p_ids = _encode(tokenizer, [(p, special) for p, _, special in rendered])
        c_ids = tokenizer([c for _, c, _ in rendered], add_special_tokens=False)["input_ids"] if rendered else []
    else:
        p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(p_ids, c_ids):
        row = list(p) + list(c)
        start = len(p) if span == "response" else 0
        if not row:
            row, start = _fallback_ids(tokenizer), 0
        cut = max(0, len(row) - max_length)
        out.append((row[cut:], max(0, start - cut)))
    return out


def _encode(tokenizer, rendered: Sequence[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of (text, add_special_tokens) items: one batched call per flag (a chat template
    writes its own special tokens), in input order."""
    out: list[list[int]] = [[] for _ in rendered]
    for flag in (True, False):
        idx = [i for i, (_, special) in enumerate(rendered) if special is flag]
        if idx:
            for i, ids in zip(idx, tokenizer([rendered[i][0] for i in idx], add_special_tokens=flag)["input_ids"]):
                out[i] = list(ids)
    return out


def _fallback_ids(tokenizer) -> list[int]:
    """One token for an empty text (so every input has a state)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 0):
        if tid is not None:
            return [int(tid)]
    return [0]


def inputs_hash(texts=None, prompts=None, completions=None) -> str:
    """sha256 (16 hex) of the inputs, in order."""
    digest = hashlib.sha256()
    for name, values in (("texts", texts), ("prompts", prompts), ("completions", completions)):
        if values is None:
            continue
        digest.update(name.encode())
        for value in values:
            data = str(value).encode()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()[:16]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def extract(model, tokenizer, texts: Sequence[str] | None = None, *,
            prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None,
            layers: Sequence[int], pooling: str = "mean", span: str | None = None,
            batch_size: int = 16, max_length: int = 512, stop_early: bool = True,
            stats: dict | None = None) -> Features:
    """Pooled residual-stream states of ``layers`` for every input, in input order.

    Returns ``{layer: Tensor[n, hidden]}`` (float32, CPU) for ``mean``/``last`` pooling and
    ``{layer: [Tensor[span_tokens, hidden], ...]}`` for ``none``. Layers may be negative;
    the keys are the resolved (non-negative) indices. ``stats`` (a dict) receives token
    counts and timing.
    """
    from probe_dpo.model import resolve_layers

    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    layer_ids = resolve_layers(model, layers)
    span, n = check_inputs(texts, prompts, completions, span)
    t0 = time.perf_counter()
    encoded = tokenize(tokenizer, texts, prompts=prompts, completions=completions, span=span,
                       max_length=max_length)
    return extract_encoded(model, encoded, layer_ids, pooling, batch_size, stop_early,
                            pad_token_id(tokenizer), stats, t0)


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def extract_encoded(model, encoded: list[tuple[list[int], int]], layer_ids: list[int], pooling: str,
                     batch_size: int, stop_early: bool, pad_id: int, stats: dict | None,
                     t0: float) -> Features:
    from probe_dpo.model import forward_until, hidden_size

    n = len(encoded)
    device = _device_of(model)
    width = hidden_size(model)
    order = sorted(range(n), key=lambda i: -len(encoded[i][0]))
    pooled = {layer: torch.zeros(n, width) for layer in layer_ids} if pooling != "none" else None
    tokens: dict[int, list[Any]] = {layer: [None] * n for layer in layer_ids} if pooling == "none" else {}
    empty = 0
    padded = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, n, batch_size):
                idx = order[b:b + batch_size]
                lengths = [len(encoded[i][0]) for i in idx]
                longest = max(lengths)
                padded += longest * len(idx)
                ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), longest), dtype=torch.long)
                span_mask = torch.zeros((len(idx), longest), dtype=torch.bool)
                for row, i in enumerate(idx):
                    seq, start = encoded[i]
                    ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, :len(seq)] = 1
                    if start < len(seq):
                        span_mask[row, start:len(seq)] = True
                    else:  # empty response: the last prompt token stands in
                        span_mask[row, len(seq) - 1] = True
                        empty += 1
                states = forward_until(model, layer_ids, stop_early=stop_early,
                                       input_ids=ids.to(device), attention_mask=mask.to(device))
                last = torch.tensor(lengths, device=device) - 1
                span_dev = span_mask.to(device)
                for layer in layer_ids:
                    h = states[layer].float()
                    if pooling == "mean":
                        w = span_dev.unsqueeze(-1).to(h.dtype)
                        pooled[layer][idx] = ((h * w).sum(1) / w.sum(1)).cpu()
                    elif pooling == "last":
                        pooled[layer][idx] = h[torch.arange(len(idx), device=device), last].cpu()
                    else:
                        for row, i in enumerate(idx):
                            tokens[layer][i] = h[row][span_dev[row]].cpu().clone()
    finally:
        model.train(was_training)
    if stats is not None:
        real = sum(len(seq) for seq, _ in encoded)
        stats.update(texts=n, tokens=real, padded_tokens=padded, empty_spans=empty,
                     seconds=time.perf_counter() - t0)
    return pooled if pooling != "none" else tokens
