"""Preference-pair files for attribution: reading them (TRL columns plus ``source``) and writing a
mitigated set in the input's own format."""

from __future__ import annotations

import tempfile
from typing import Sequence

from probe_dpo.data import PAIR_COLUMNS
from probe_dpo.storage import artifacts


def read_pair_file(uri: str) -> list[dict]:
    """Preference pairs (any input ``read_records`` takes) with non-empty columns ``prompt``,
    ``chosen``, ``rejected`` (strings or message lists) and an optional ``source``; one UserError
    line otherwise, before any extraction."""
    from probe_dpo.data import read_pair_records

    return read_pair_records(uri, non_empty=PAIR_COLUMNS)


def pair_sources(pairs: Sequence[dict]) -> list[str]:
    """Each pair's source (``"(none)"`` where there is none)."""
    return [str(p.get("source") or "(none)") for p in pairs]


def write_pairs_like(records: Sequence[dict], uri: str, like: str) -> str:
    """Write ``records`` at ``uri`` in the format of the pair file ``like``; returns the URI.

    A jsonl/parquet input gives a file of the same kind (``uri`` + its suffix); a folder
    (``datasets.save_to_disk`` or shards) gives a ``save_to_disk`` folder at ``uri``.
    """
    from probe_dpo.data import JSONL_SUFFIXES, PARQUET_SUFFIXES, write_records

    lower = str(like).lower().rstrip("/")
    if lower.endswith(PARQUET_SUFFIXES):
        target = uri + ".parquet"
        write_records(records, target)
        return target
    if lower.endswith(JSONL_SUFFIXES):
        target = uri + ".jsonl"
        write_records(records, target)
        return target
    from datasets import Dataset

    with tempfile.TemporaryDirectory(prefix="probe-dpo-pairs-") as tmp:
        Dataset.from_list(list(records)).save_to_disk(tmp)
        artifacts.publish_dir(tmp, uri, metadata={"kind": "pairs", "rows": len(records)}, overwrite=True)
    return uri
