"""probe_dpo: post-train language models against linear probes on their own hidden states.

The TRL trainers with the probe penalty are importable from here, as TRL users expect::

    from probe_dpo import ProbeDPOConfig, ProbeDPOTrainer, ProbeSFTConfig, ProbeSFTTrainer
    from probe_dpo import ProbeGRPOConfig, ProbeGRPOTrainer   # GRPO with a probe reward

They are loaded on first use (``import probe_dpo`` alone does not import torch or TRL).
"""

__version__ = "0.1.0"

_LAZY = {
    "ProbeDPOConfig": "probe_dpo.training.trainers",
    "ProbeDPOTrainer": "probe_dpo.training.trainers",
    "ProbeSFTConfig": "probe_dpo.training.trainers",
    "ProbeSFTTrainer": "probe_dpo.training.trainers",
    "ProbeGRPOConfig": "probe_dpo.training.grpo",
    "ProbeGRPOTrainer": "probe_dpo.training.grpo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
