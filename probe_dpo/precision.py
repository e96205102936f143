"""The matmul precision of inference: float32, or bfloat16 under autocast where it is native.

Sampling and reading probe rows tolerate bfloat16 matmuls: on this project's 2-core AVX512-BF16
box sampling is 1.44x faster and reading probe rows 1.8x (``benchmarks/generation.py``), and
the residual stream a probe reads moves by under 0.5% (relative L2). Quantities that are *differences* between two close models do not tolerate it:
KL(policy || base) of a lightly fine-tuned policy came out 20% low for one arm and 17% high for
another under bfloat16, because the fine-tuning moves weights by less than bfloat16's
resolution. So KL, perplexity, training on CPUs and the probe math stay float32 whatever is
set here.

``autocast`` keeps the float32 weights and runs each matmul in bfloat16 (no model copy); the
setting ``"auto"`` means bfloat16 on a GPU, or on a CPU with native bfloat16 instructions
(AVX512-BF16 or AMX), else float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

Precision = Literal["float32", "bfloat16", "auto"]


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open(cpuinfo) as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions; emulated bfloat16 (no flag, or
    not Linux) is no faster than float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _kind(device: Any) -> str:
    """"cpu" or "cuda" from a torch device or its name ("cuda:1")."""
    return getattr(device, "type", str(device)).split(":")[0]


def resolve(precision: str, device: Any) -> str:
    """``"float32"`` or ``"bfloat16"`` for work on ``device`` (a torch device or its name)."""
    if precision != "auto":
        return precision
    kind = _kind(device)
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "float32"


def autocast(precision: str, device: Any) -> contextlib.AbstractContextManager:
    """A context running matmuls on ``device`` in ``precision`` (autocast for bfloat16)."""
    import torch

    if resolve(precision, device) != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_kind(device), dtype=torch.bfloat16)
