"""The gradient comparator (LESS / LoGra style): cosine of each pair's DPO-loss gradient with the
behaviour's log-likelihood gradient, after a seeded random projection.

Three modes. ``dense`` and ``factorized`` take gradients of the model as it is (one checkpoint:
the start of training). ``lora-adam`` is closer to published LESS: LoRA adapters are warmed up
with DPO on a small random share of the pairs for a few epochs; at the end of each epoch every
pair's DPO gradient on the adapters is turned into the Adam update it would cause (with that
checkpoint's moment estimates), projected, and compared with the behaviour's gradient there; the
score is the learning-rate-weighted sum over checkpoints."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from probe_dpo.attribution.scores import cosine_scores
from probe_dpo.config import bounded
from probe_dpo.data import chat_value
from probe_dpo.errors import UserError


@dataclass
class GradientConfig:
    """The gradient comparator's settings."""

    mode: Literal["dense", "factorized", "lora-adam"] = "dense"
    """dense: per-pair gradients of the ``params`` subset, one pair at a time, projected with a
    seeded Rademacher matrix generated chunk by chunk (LESS / TRAK). factorized: per-example
    gradients of every linear module named in ``modules``, projected as (P_out^T G P_in) with
    seeded Gaussian factors, batched through hooks (LoGra). lora-adam: LESS with a LoRA warm-up
    (``lora_*``, ``warmup_*``), Adam-preconditioned pair gradients at each warm-up checkpoint,
    projected like dense."""
    params: list[str] = field(default_factory=lambda: ["self_attn.v_proj.weight"])
    """dense: parameters whose name contains one of these strings."""
    modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    """factorized: linear modules (last name part) inside the decoder layers."""
    dim: int = bounded(2048, ge=1)
    """dense: projected dimensions."""
    rank: int = bounded(4, ge=1)
    """factorized: projected size per side (rank² dims per module)."""
    chunk: int = bounded(1 << 16, ge=1)
    """dense: parameter rows of the projection matrix generated at once."""
    batch_size: int = bounded(128, ge=1)
    """dense: pair gradients buffered per projection pass (each pass regenerates the projection
    matrix; memory = batch_size x parameters x 4 bytes)."""
    sequences_per_batch: int = bounded(16, ge=1)
    """factorized: sequences per forward/backward pass."""
    behaviour_batch_size: int = bounded(8, ge=1)
    """Behaviour examples per backward pass."""
    max_length: int = bounded(256, ge=8)
    """Tokens kept per sequence."""
    add_eos: bool = True
    """Append EOS to each response (as TRL's DPO does)."""
    seed: int = bounded(0, ge=0)
    """Seeds the random projection (and lora-adam's warm-up sample and order)."""
    lora_rank: int = bounded(8, ge=1)
    """lora-adam: adapter rank."""
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """lora-adam: modules that get adapters."""
    warmup_fraction: float = bounded(0.05, gt=0.0, le=1.0)
    """lora-adam: share of the pairs the warm-up trains on (LESS: 5%)."""
    warmup_epochs: int = bounded(4, ge=1)
    """lora-adam: warm-up epochs; a checkpoint after each (LESS: 4)."""
    warmup_lr: float = bounded(2e-5, gt=0.0)
    """lora-adam: the warm-up's Adam learning rate (LESS: 2e-5); also each checkpoint's weight."""
    warmup_batch_size: int = bounded(4, ge=1)
    """lora-adam: pairs per warm-up step."""
    beta: float = bounded(0.1, gt=0.0)
    """lora-adam: DPO beta of the warm-up and of the pair gradients."""


def _encode_pairs(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], cfg: GradientConfig):
    from probe_dpo.activations import tokenize

    eos = tokenizer.eos_token or ""
    comps = [c + eos if cfg.add_eos else c for c in completions]
    return tokenize(tokenizer, prompts=list(prompts), completions=comps, span="response", max_length=cfg.max_length)


def _batch(encoded, pad_id: int):
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    target = torch.zeros((len(encoded), width), dtype=torch.bool)  # positions whose NEXT token is a response token
    for r, (seq, start) in enumerate(encoded):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        if start < len(seq):
            target[r, max(start - 1, 0):len(seq) - 1] = True
            if start == 0:
                target[r, :len(seq) - 1] = True
    return ids, mask, target


def sequence_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of each sequence's response tokens: ``[batch]``."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * target[:, :-1].to(logp.dtype)).sum(1)


class RademacherProjection:
    """``x @ R / sqrt(k)`` with R a seeded ±1 matrix ``[d, k]`` generated chunk by chunk (never stored)."""

    def __init__(self, d: int, k: int, seed: int, chunk: int = 1 << 18):
        self.d, self.k, self.seed, self.chunk = int(d), int(k), int(seed), int(chunk)

    _SHIFTS = torch.arange(8, dtype=torch.uint8)

    def _block(self, start: int, rows: int) -> torch.Tensor:
        """Rows ``start .. start+rows`` of R: 64 random bits per int64 draw, unpacked to ±1."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.chunk)
        words = (self.k + 63) // 64
        bits = torch.randint(-2**63, 2**63 - 1, (rows, words), generator=gen, dtype=torch.int64).view(torch.uint8)
        signs = ((bits.unsqueeze(-1) >> self._SHIFTS) & 1).reshape(rows, words * 64)[:, :self.k]
        return signs.float().mul_(2).sub_(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"projection of size {self.d} got vectors of size {x.shape[-1]}")
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32)
        for start in range(0, self.d, self.chunk):
            rows = min(self.chunk, self.d - start)
            out += x[:, start:start + rows].float() @ self._block(start, rows)
        return out / math.sqrt(self.k)


def _dense_features(model, tokenizer, prompts, completions, sign, cfg: GradientConfig, params, proj,
                    per_example: bool, batch: int, pad_id: int) -> torch.Tensor:
    """Projected gradients: per item (``per_example``: items are pairs of rows with ``sign``) or summed."""
    encoded = _encode_pairs(tokenizer, prompts, completions, cfg)
    if per_example:
        feats, buffer = [], []
        for i in range(0, len(encoded), 2):
            ids, mask, target = _batch(encoded[i:i + 2], pad_id)
            lp = sequence_logprobs(model, ids, mask, target)
            grads = torch.autograd.grad((lp * torch.tensor(sign[i:i + 2], dtype=lp.dtype)).sum(), params)
            buffer.append(torch.cat([g.reshape(-1) for g in grads]))
            if len(buffer) == cfg.batch_size:
                feats.append(proj(torch.stack(buffer)))
                buffer = []
        if buffer:
            feats.append(proj(torch.stack(buffer)))
        return torch.cat(feats)
    total = None
    for i in range(0, len(encoded), batch):
        ids, mask, target = _batch(encoded[i:i + batch], pad_id)
        lp = sequence_logprobs(model, ids, mask, target)
        grads = torch.autograd.grad(lp.sum(), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = flat if total is None else total + flat
    return proj(total.unsqueeze(0))[0]


class _FactorizedRecorder:
    """Hooks on linear modules: per-example projected gradients ``P_out^T G P_in`` (LoGra)."""

    def __init__(self, model, names: Sequence[str], rank: int, seed: int):
        from probe_dpo.model import get_layers, unwrap_model

        layers = get_layers(unwrap_model(model))
        self.modules = []
        for li, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
                    self.modules.append((f"{li}.{name}", module))
        if not self.modules:
            raise UserError(f"gradient comparator: no linear modules named {list(names)} in the decoder layers")
        self.p_in, self.p_out = {}, {}
        for j, (key, m) in enumerate(self.modules):
            gen = torch.Generator().manual_seed(seed * 7919 + j)
            self.p_in[key] = torch.randn(m.in_features, rank, generator=gen) / math.sqrt(rank)
            self.p_out[key] = torch.randn(m.out_features, rank, generator=gen) / math.sqrt(rank)
        self.rank = rank
        self.x: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.handles = []

    @property
    def dim(self) -> int:
        return len(self.modules) * self.rank * self.rank

    def __enter__(self):
        for key, module in self.modules:
            def hook(mod, inputs, output, key=key):
                self.x[key] = inputs[0].detach().float() @ self.p_in[key]
                if output.requires_grad:
                    output.register_hook(lambda grad, key=key: self.g.__setitem__(key, grad.float() @ self.p_out[key]))
            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def per_example(self) -> torch.Tensor:
        parts = [torch.einsum("bto,bti->boi", self.g[key], self.x[key]).reshape(self.x[key].shape[0], -1)
                 for key, _ in self.modules]
        self.x, self.g = {}, {}
        return torch.cat(parts, dim=1)


def _factorized_features(model, tokenizer, prompts, completions, cfg, recorder, batch: int, pad_id: int):
    """Per-sequence projected gradients of each sequence's response log-likelihood: ``[n, dim]``."""
    encoded = _encode_pairs(tokenizer, prompts, completions, cfg)
    embed = model.get_input_embeddings()
    out = []
    holder: dict[str, torch.Tensor] = {}

    def leaf(mod, inputs, output):
        output = output.detach().requires_grad_(True)
        holder["e"] = output
        return output

    handle = embed.register_forward_hook(leaf)
    try:
        with recorder:
            for i in range(0, len(encoded), batch):
                ids, mask, target = _batch(encoded[i:i + batch], pad_id)
                lp = sequence_logprobs(model, ids, mask, target)
                torch.autograd.grad(lp.sum(), [holder["e"]])
                out.append(recorder.per_example())
    finally:
        handle.remove()
    return torch.cat(out)


def _lora_adam_scores(model, tokenizer, prompts, completions, b_prompts, b_completions, cfg: GradientConfig,
                      pad_id: int) -> tuple[np.ndarray, dict]:
    """LESS with a LoRA warm-up: per pair, sum over warm-up checkpoints of lr x cos(P u, P g_b),
    where u is minus the Adam update the pair's DPO gradient would cause at that checkpoint
    (``m' / sqrt(v' + eps)`` with the checkpoint's moments, as LESS computes it) and g_b is the
    behaviour's log-likelihood gradient there. The reference of the DPO loss is the model with
    its adapters off. The adapters live on a copy: ``model`` is left as it was."""
    import copy

    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    with torch.random.fork_rng():  # seeded adapter initialisation, the caller's random state untouched
        torch.manual_seed(cfg.seed)
        lm = get_peft_model(copy.deepcopy(model), LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                             lora_dropout=0.0, target_modules=list(cfg.lora_modules)))
    lm.eval()
    params = [p for p in lm.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    proj = RademacherProjection(d, cfg.dim, cfg.seed, cfg.chunk)
    encoded = _encode_pairs(tokenizer, prompts, completions, cfg)  # chosen, rejected, chosen, ...
    n = len(encoded) // 2

    def logps(idx: Sequence[int]) -> torch.Tensor:  # [len(idx), 2]: chosen, rejected
        rows = [encoded[2 * i + j] for i in idx for j in (0, 1)]
        return sequence_logprobs(lm, *_batch(rows, pad_id)).view(len(idx), 2)

    with torch.no_grad(), lm.disable_adapter():
        ref = torch.cat([logps(range(i, min(i + 8, n))) for i in range(0, n, 8)])

    def dpo_loss(idx: Sequence[int]) -> torch.Tensor:
        margin = (logps(idx) - ref[list(idx)]) @ torch.tensor([1.0, -1.0])
        return -torch.nn.functional.logsigmoid(cfg.beta * margin).mean()

    rng = np.random.default_rng(cfg.seed)
    warm = rng.choice(n, max(1, int(round(cfg.warmup_fraction * n))), replace=False)
    opt = torch.optim.Adam(params, lr=cfg.warmup_lr)
    beta1, beta2 = opt.defaults["betas"]
    eps = 1e-8
    scores = torch.zeros(n, dtype=torch.float64)
    warm_losses = []
    bar = tqdm(total=cfg.warmup_epochs * (n + len(b_prompts)), desc="LESS gradients", unit="seq", file=sys.stderr,
               mininterval=2.0, dynamic_ncols=True)
    for _ in range(cfg.warmup_epochs):
        order = rng.permutation(warm)
        for b in range(0, len(order), cfg.warmup_batch_size):
            loss = dpo_loss(order[b:b + cfg.warmup_batch_size].tolist())
            opt.zero_grad()
            loss.backward()
            opt.step()
            warm_losses.append(float(loss.detach()))
        m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
        v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
        feats, buffer = [], []
        for i in range(n):
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(dpo_loss([i]), params)])
            buffer.append(-(beta1 * m + (1 - beta1) * g) / torch.sqrt(beta2 * v + (1 - beta2) * g * g + eps))
            if len(buffer) == cfg.batch_size or i == n - 1:
                feats.append(proj(torch.stack(buffer)))
                buffer = []
            bar.update()
        g_b = _dense_features(lm, tokenizer, b_prompts, b_completions, None, cfg, params, proj, False,
                              cfg.behaviour_batch_size, pad_id)
        bar.update(len(b_prompts))
        scores += cfg.warmup_lr * torch.as_tensor(cosine_scores(torch.cat(feats), g_b), dtype=torch.float64)
    bar.close()
    info = {"mode": "lora-adam", "parameters": int(d), "dim": cfg.dim, "lora_rank": cfg.lora_rank,
            "lora_modules": list(cfg.lora_modules), "warmup_pairs": len(warm), "checkpoints": cfg.warmup_epochs,
            "warmup_steps": len(warm_losses), "warmup_loss_first": warm_losses[0], "warmup_loss_last": warm_losses[-1]}
    return scores.numpy(), info


def gradient_scores(model: Any, tokenizer: Any, pairs: Sequence[dict], behaviour: Sequence[dict],
                    cfg: GradientConfig | None = None) -> tuple[np.ndarray, dict]:
    """LESS-style scores: ``cos(P g_pair, P g_behaviour)`` per pair.

    ``g_pair`` is the negative gradient of the pair's DPO loss at the start of training,
    where the policy equals the frozen reference (the model itself): there
    ``-grad L_DPO = (beta / 2) (grad log p(chosen | prompt) - grad log p(rejected | prompt))``,
    so its direction is that of ``grad log p(chosen) - grad log p(rejected)`` (exactly; no
    reference forward is needed). ``g_behaviour`` is the gradient of the summed
    log-likelihood of ``behaviour`` records (prompt, completion: examples of the behaviour).
    A positive score means a step on the pair raises the behaviour's likelihood.
    """
    from probe_dpo.activations.extract import pad_token_id

    cfg = cfg or GradientConfig()
    if not behaviour:
        raise UserError("gradient comparator: no behaviour examples")
    t0 = time.perf_counter()
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    completions = [c for p in pairs for c in (p["chosen"], p["rejected"])]
    b_prompts = [chat_value(r["prompt"]) for r in behaviour]
    b_completions = [chat_value(r.get("completion")) for r in behaviour]
    try:
        if cfg.mode == "dense":
            params = []
            for name, p in model.named_parameters():
                use = any(s in name for s in cfg.params)
                p.requires_grad_(use)
                if use:
                    params.append(p)
            if not params:
                raise UserError(f"gradient comparator: no parameters match {cfg.params}")
            d = sum(p.numel() for p in params)
            proj = RademacherProjection(d, cfg.dim, cfg.seed, cfg.chunk)
            sign = [1.0, -1.0] * len(pairs)
            g_pairs = _dense_features(model, tokenizer, prompts, completions, sign, cfg, params, proj, True,
                                      2, pad_id)
            g_b = _dense_features(model, tokenizer, b_prompts, b_completions, None, cfg, params, proj, False,
                                  cfg.behaviour_batch_size, pad_id)
            scores = cosine_scores(g_pairs, g_b)
            info = {"mode": "dense", "parameters": int(d), "dim": cfg.dim, "params": list(cfg.params)}
        elif cfg.mode == "factorized":
            for p in model.parameters():
                p.requires_grad_(False)
            recorder = _FactorizedRecorder(model, cfg.modules, cfg.rank, cfg.seed)
            per_seq = _factorized_features(model, tokenizer, prompts, completions, cfg, recorder,
                                           cfg.sequences_per_batch, pad_id)
            g_pairs = per_seq[0::2] - per_seq[1::2]
            g_b = _factorized_features(model, tokenizer, b_prompts, b_completions, cfg, recorder,
                                       cfg.behaviour_batch_size, pad_id).sum(0)
            scores = cosine_scores(g_pairs, g_b)
            info = {"mode": "factorized", "modules": len(recorder.modules), "dim": recorder.dim, "rank": cfg.rank,
                    "parameters": int(sum(m.weight.numel() for _, m in recorder.modules))}
        elif cfg.mode == "lora-adam":
            for p in model.parameters():
                p.requires_grad_(False)
            scores, info = _lora_adam_scores(model, tokenizer, prompts, completions, b_prompts, b_completions,
                                             cfg, pad_id)
        else:
            raise UserError(f"gradient comparator: unknown mode {cfg.mode!r} (dense, factorized or lora-adam)")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    info.update(seconds=round(time.perf_counter() - t0, 3), pairs=len(pairs), behaviour_examples=len(behaviour))
    return scores, info
