"""Where everything lives in a testbed folder or URI: one definition for the two builders
(``build``, ``behaviour``) and every reader (probe training, the training run, the experiment,
the attribution study). The folder's files are listed in ``probe_dpo.testbed``'s docstring."""

from __future__ import annotations

from dataclasses import dataclass

from probe_dpo import storage

INFO = "testbed.json"
"""The summary, written last: its presence marks a complete build."""
MODEL = "model"
DATA = "data"
SPLITS = ("prompts_train", "prompts_heldout", "probe_train", "probe_val", "probe_test", "heldout_generations",
          "sft", "perplexity", "pairs")


def data_file(split: str) -> str:
    """The file name of a data split (``probe_train`` -> ``probe_train.jsonl``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown testbed split {split!r} (known: {', '.join(SPLITS)})")
    return f"{split}.jsonl"


@dataclass(frozen=True)
class TestbedPaths:
    """The paths of one testbed, local or remote (``storage.join`` makes either)."""

    __test__ = False  # not a pytest test class

    root: str

    @property
    def info(self) -> str:
        return storage.join(str(self.root), INFO)

    @property
    def model(self) -> str:
        return storage.join(str(self.root), MODEL)

    def data(self, split: str) -> str:
        return storage.join(str(self.root), DATA, data_file(split))
