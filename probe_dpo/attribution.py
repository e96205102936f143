"""Probe-based data attribution: rank the pairs of a preference set by a behaviour direction.

For a preference pair (prompt, chosen, rejected) and the model BEFORE DPO, the pair's vector
at layer L is

    v_d = act(prompt, chosen) - act(prompt, rejected)

where ``act`` is the mean of the residual stream at L over the response tokens only (the
extractor's ``span="response"``, ``pooling="mean"``). A behaviour direction ``v_b`` at L is

- ``diff-of-means``: mean act of examples showing the behaviour minus mean act of examples
  that do not (response tokens only), L2-normalised (the published method), or
- ``probe``: a trained probe's direction in activation space (``LinearProbe.direction()``).

A pair's score is ``cos(v_d, v_b)``: how much DPO on it pushes the model's responses along
the behaviour. Pairs are ranked by score; sources are aggregated (mean score with a
bootstrap CI, share of the source's pairs in the top-k with a Wilson CI, enrichment), and
three mitigations write a new pair file in the input's format: ``filter`` (drop the top
pairs), ``swap`` (swap chosen and rejected of the top pairs), ``drop-sources`` (drop the
sources flagged as enriched in the top-k). Clustering the unit pair vectors (k-means,
scikit-learn; k by silhouette) surfaces behaviours no direction covers.

Comparators on the same model and data: ``judge_scores`` (judge(chosen) - judge(rejected),
the LLM-judge baseline with an offline judge) and ``gradient_scores`` (LESS-style: cosine of
each pair's DPO-loss gradient with the gradient of the behaviour's log-likelihood on a small
set of behaviour examples, after a seeded random projection; ``dense`` projects per-pair
gradients of a parameter subset with a chunk-wise generated Rademacher matrix as LESS does,
``factorized`` projects every linear layer's per-example gradient with a Kronecker-factored
Gaussian projection as LoGra does).

Pair activations come from the Ray-sharded extractor (``extract_sharded`` on an
``ExtractorPool``) or, when asked, from in-process ``extract``.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from probe_dpo import storage
from probe_dpo.config import bounded
from probe_dpo.data import PAIR_COLUMNS
from probe_dpo.errors import UserError

DIRECTIONS_FORMAT = "probe_dpo.directions/1"
MITIGATIONS = ("filter", "swap", "drop-sources")
DIRECTION_KINDS = ("diff-of-means", "probe", "cluster")


# ---------------------------------------------------------------------------------------------
# Pair files


def read_pair_file(uri: str) -> list[dict]:
    """Preference pairs (jsonl / parquet / ``save_to_disk`` folder) with non-empty string columns
    ``prompt``, ``chosen``, ``rejected`` and an optional ``source``; one UserError line otherwise."""
    from probe_dpo.data import check_pairs, read_records

    records = read_records(uri, required=PAIR_COLUMNS, non_empty=PAIR_COLUMNS, what="preference pairs")
    check_pairs(records, uri)  # strings, chosen != rejected, numeric scores: before any extraction
    return records


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
        storage.publish_dir(tmp, uri, metadata={"kind": "pairs", "rows": len(records)}, overwrite=True)
    return uri


# ---------------------------------------------------------------------------------------------
# Directions


@dataclass
class Direction:
    """A unit vector in one layer's residual stream, with what it is and where it came from."""

    name: str
    layer: int
    vector: torch.Tensor
    kind: str = "diff-of-means"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        v = torch.as_tensor(self.vector, dtype=torch.float32).reshape(-1)
        norm = float(v.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise UserError(f"direction {self.name}: the vector is zero or not finite")
        self.vector = v / norm
        self.layer = int(self.layer)

    @property
    def hidden_size(self) -> int:
        return int(self.vector.numel())


def diff_of_means(positive: torch.Tensor, negative: torch.Tensor, *, layer: int,
                  name: str = "diff-of-means", meta: dict | None = None) -> Direction:
    """mean(positive) - mean(negative), L2-normalised (rows are pooled activations)."""
    if len(positive) == 0 or len(negative) == 0:
        raise UserError(f"direction {name}: needs examples with and without the behaviour "
                        f"(got {len(positive)} and {len(negative)})")
    v = positive.double().mean(0) - negative.double().mean(0)
    return Direction(name, layer, v.float(), "diff-of-means",
                     {"positives": int(len(positive)), "negatives": int(len(negative)), **(meta or {})})


def probe_directions(probeset: Any, names: Sequence[str] | None = None) -> list[Direction]:
    """One direction per probe (``weight / std``, normalised): ``probe:<name>``."""
    out = []
    for probe in probeset.probes:
        if names and probe.name not in names:
            continue
        out.append(Direction(f"probe:{probe.name}", probe.layer, probe.direction(), "probe",
                             {"probe": probe.name, "role": probe.role, "pooling": probe.pooling,
                              "span": probe.span}))
    if names:
        missing = [n for n in names if n not in {p.name for p in probeset.probes}]
        if missing:
            raise UserError(f"probes {probeset.uri or ''}: no probe named {missing[0]} "
                            f"(has: {', '.join(p.name for p in probeset.probes)})")
    return out


def save_directions(directions: Sequence[Direction], uri: str, metadata: dict | None = None) -> dict:
    """Publish directions as ``directions.safetensors`` + ``directions.json`` (manifest last)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if not directions:
        raise UserError("no directions to save")
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise UserError(f"direction names must be unique, got {names}")
    with tempfile.TemporaryDirectory(prefix="probe-dpo-directions-") as tmp:
        root = Path(tmp)
        save_file({f"d{i}": d.vector.contiguous() for i, d in enumerate(directions)},
                  str(root / "directions.safetensors"), metadata={"format": DIRECTIONS_FORMAT})
        card = {"format": DIRECTIONS_FORMAT, **(metadata or {}),
                "directions": [{"name": d.name, "tensor": f"d{i}", "layer": d.layer, "kind": d.kind,
                                "hidden_size": d.hidden_size, "meta": d.meta} for i, d in enumerate(directions)]}
        (root / "directions.json").write_text(json.dumps(card, indent=2, default=_plain) + "\n")
        return storage.publish_dir(root, uri, metadata={"kind": "directions", "count": len(directions)},
                                   overwrite=True)


def load_directions(uri: str) -> tuple[list[Direction], dict]:
    """Directions from a directions artifact or a probe set (every probe's direction)."""
    from safetensors.torch import load

    if storage.exists(storage.join(uri, "probeset.json")):
        from probe_dpo.probes import ProbeSet

        probeset = ProbeSet.load(uri)
        return probe_directions(probeset), {"kind": "probeset", **probeset.meta}
    if not storage.is_complete(uri):
        raise UserError(f"directions {uri}: neither a probe set nor a complete directions artifact "
                        f"(no probeset.json / {storage.MANIFEST_NAME})")
    card = storage.read_json(storage.join(uri, "directions.json"))
    if not isinstance(card, dict) or card.get("format") != DIRECTIONS_FORMAT:
        raise UserError(f"directions {uri}: directions.json is not a {DIRECTIONS_FORMAT} card")
    tensors = load(storage.read_bytes(storage.join(uri, "directions.safetensors")))
    out = [Direction(e["name"], e["layer"], tensors[e["tensor"]], e.get("kind", "diff-of-means"), e.get("meta") or {})
           for e in card["directions"]]
    return out, {k: v for k, v in card.items() if k not in ("format", "directions")}


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(type(value).__name__)


def model_facts(model: str) -> dict:
    """Hidden size, layer count and architecture hash from a model folder's config alone."""
    from probe_dpo.model import _config_dict, arch_hash

    config = _config_dict(model)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = next((text[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(text.get(k), int)), None)
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer") if isinstance(text.get(k), int)), None)
    return {"hidden_size": hidden, "num_layers": layers, "arch_hash": arch_hash(model)}


def check_directions(directions: Sequence[Direction], model: str, *, where: str = "directions",
                     arch: str | None = None) -> None:
    """UserError unless every direction fits ``model``: hidden size, layer range, architecture."""
    facts = model_facts(model)
    if arch and arch != facts["arch_hash"]:
        raise UserError(f"{where} come from a different architecture ({arch}) than model {model} "
                        f"({facts['arch_hash']}): make them on this model")
    for d in directions:
        if facts["hidden_size"] is not None and d.hidden_size != facts["hidden_size"]:
            raise UserError(f"{where}: {d.name} has hidden size {d.hidden_size}, but model {model} has hidden size "
                            f"{facts['hidden_size']}: they come from another model")
        if facts["num_layers"] is not None and not 0 <= d.layer < facts["num_layers"]:
            raise UserError(f"{where}: {d.name} reads layer {d.layer}, but model {model} has layers "
                            f"0..{facts['num_layers'] - 1}")


# ---------------------------------------------------------------------------------------------
# Pair activations


@dataclass
class PairFeatures:
    """Pooled response activations of each pair's chosen and rejected response, by layer."""

    chosen: dict[int, torch.Tensor]
    rejected: dict[int, torch.Tensor]
    seconds: float = 0.0
    how: str = ""

    def diffs(self, layer: int) -> torch.Tensor:
        """``v_d = act(chosen) - act(rejected)`` for every pair at ``layer``: ``[n, hidden]``."""
        if layer not in self.chosen:
            raise UserError(f"no pair activations for layer {layer} (have layers {sorted(self.chosen)})")
        return self.chosen[layer] - self.rejected[layer]

    @property
    def layers(self) -> list[int]:
        return sorted(self.chosen)


def pair_features(model: Any, pairs: Sequence[dict], layers: Sequence[int], *, tokenizer: Any = None,
                  pool: Any = None, activations: str | None = None, in_process: bool = False,
                  batch_size: int = 16, max_length: int = 256, shard_size: int = 256,
                  actors: int | None = None, threads_per_actor: int = 1, address: str | None = None) -> PairFeatures:
    """Mean response-token activations of chosen and rejected responses at ``layers``.

    ``model`` is a module (with ``tokenizer``: in-process ``extract``) or a model folder/URI:
    sharded over Ray actors (``pool``, or actors started for this call) with the shards in
    ``activations`` (when given, a restart reuses complete shards; else a temporary folder), or
    in-process with ``in_process=True``. One extraction covers both responses of every pair.
    """
    from probe_dpo.activations import extract, extract_sharded, shards_folder

    n = len(pairs)
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    t0 = time.perf_counter()
    if isinstance(model, torch.nn.Module) or in_process:
        lm, tok = model, tokenizer
        if not isinstance(model, torch.nn.Module):
            from probe_dpo.model import load_model, load_tokenizer

            lm, tok = load_model(str(model)), load_tokenizer(str(model))
        if tok is None:
            raise UserError("in-process extraction of a model object needs its tokenizer")
        feats = extract(lm, tok, prompts=prompts, completions=completions, layers=layers, pooling="mean",
                        span="response", batch_size=batch_size, max_length=max_length)
        how = "in-process"
    else:
        with shards_folder(activations, "probe-dpo-pair-activations-") as where:
            feats = extract_sharded(str(model), where, prompts=prompts, completions=completions, layers=layers,
                                    pooling="mean", span="response", batch_size=batch_size, max_length=max_length,
                                    shard_size=shard_size, pool=pool, actors=actors,
                                    threads_per_actor=threads_per_actor, address=address, overwrite=True)
        how = "sharded"
    return PairFeatures({L: v[:n] for L, v in feats.items()}, {L: v[n:] for L, v in feats.items()},
                        time.perf_counter() - t0, how)


def behaviour_direction(model: Any, records: Sequence[dict], layer: int, *, tokenizer: Any = None,
                        pool: Any = None, activations: str | None = None, in_process: bool = False,
                        label_column: str = "label", batch_size: int = 16, max_length: int = 256,
                        name: str = "diff-of-means") -> Direction:
    """The difference-of-means direction at ``layer`` from labelled (prompt, completion) records."""
    from probe_dpo.activations import extract, extract_sharded, shards_folder
    from probe_dpo.data import check_columns, check_labels

    check_columns(records, ("prompt", "completion", label_column), where="behaviour data")
    check_labels(records, label_column, what="behaviour data")
    labels = np.array([float(r[label_column]) > 0.5 for r in records])
    cols = {"prompts": [str(r["prompt"]) for r in records],
            "completions": [str(r.get("completion") or "") for r in records]}
    if isinstance(model, torch.nn.Module) or in_process:
        lm, tok = model, tokenizer
        if not isinstance(model, torch.nn.Module):
            from probe_dpo.model import load_model, load_tokenizer

            lm, tok = load_model(str(model)), load_tokenizer(str(model))
        feats = extract(lm, tok, layers=[layer], pooling="mean", span="response", batch_size=batch_size,
                        max_length=max_length, **cols)
    else:
        with shards_folder(activations, "probe-dpo-behaviour-activations-") as where:
            feats = extract_sharded(str(model), where, layers=[layer], pooling="mean", span="response",
                                    batch_size=batch_size, max_length=max_length, pool=pool, overwrite=True, **cols)
    x = feats[layer]
    mask = torch.as_tensor(labels)
    return diff_of_means(x[mask], x[~mask], layer=layer, name=name, meta={"examples": len(records)})


# ---------------------------------------------------------------------------------------------
# Scores, ranks, recall


def cosine_scores(diffs: torch.Tensor, direction: Direction | torch.Tensor) -> np.ndarray:
    """``cos(v_d, v_b)`` per pair (0 for a pair whose two responses have identical activations)."""
    v = direction.vector if isinstance(direction, Direction) else torch.as_tensor(direction, dtype=torch.float32)
    d = diffs.double()
    v = v.double().reshape(-1)
    if d.shape[-1] != v.numel():
        raise UserError(f"direction has hidden size {v.numel()}, pair activations have {d.shape[-1]}")
    norms = d.norm(dim=1)
    cos = (d @ v) / (norms * v.norm()).clamp_min(1e-30)
    cos[norms == 0] = 0.0
    return cos.numpy()


def projections(diffs: torch.Tensor, direction: Direction) -> np.ndarray:
    """``v_d · u`` per pair (u the unit direction): the signed length of each pair's push."""
    return (diffs.double() @ direction.vector.double()).numpy()


def ranking(scores: Sequence[float]) -> np.ndarray:
    """Pair indices from the highest score to the lowest (ties: lower index first)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(s)), -s))


def ranks(scores: Sequence[float]) -> np.ndarray:
    """Each pair's rank (1 = highest score)."""
    order = ranking(scores)
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def top_k_mask(scores: Sequence[float], k: int) -> np.ndarray:
    mask = np.zeros(len(scores), dtype=bool)
    mask[ranking(scores)[:max(0, int(k))]] = True
    return mask


def recall_at_k(scores: Sequence[float], bad: Sequence[bool], k: int) -> float:
    """Share of the ``bad`` pairs that are among the ``k`` highest-scoring pairs."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return float("nan")
    return float((top_k_mask(scores, k) & bad).sum() / bad.sum())


def recall_curve(scores: Sequence[float], bad: Sequence[bool], ks: Sequence[int] | None = None) -> dict:
    """Recall and precision at each k (default: every k from 1 to n)."""
    bad = np.asarray(bad, dtype=bool)
    order = ranking(scores)
    hits = np.cumsum(bad[order])
    ks = list(range(1, len(order) + 1)) if ks is None else [int(k) for k in ks]
    total = max(1, int(bad.sum()))
    return {"k": ks, "recall": [float(hits[k - 1] / total) if k > 0 else 0.0 for k in ks],
            "precision": [float(hits[k - 1] / k) if k > 0 else float("nan") for k in ks]}


def _wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap_mean_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    lo, hi = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def source_table(scores: Sequence[float], sources: Sequence[str], k: int, *, n_boot: int = 2000,
                 seed: int = 0) -> list[dict]:
    """Per source: mean score (95% bootstrap CI over its pairs), its pairs in the top-k (with a
    95% Wilson CI of the share), its share of the top-k, and enrichment (share / (k/n)).

    A source is ``flagged`` when the lower end of its top-k share's CI is above the share
    expected by chance (k/n): its pairs are over-represented among the top pairs. Rows are
    ranked by mean score (highest first).
    """
    s = np.asarray(scores, dtype=np.float64)
    src = np.asarray(list(sources), dtype=object)
    n = len(s)
    k = int(min(max(k, 0), n))
    top = top_k_mask(s, k)
    expected = k / n if n else float("nan")
    rng = np.random.default_rng(seed)
    rows = []
    for name in sorted(set(src.tolist())):
        mask = src == name
        vals = s[mask]
        in_top = int((top & mask).sum())
        lo, hi = _bootstrap_mean_ci(vals, n_boot, rng)
        slo, shi = _wilson(in_top, int(mask.sum()))
        share = in_top / int(mask.sum())
        rows.append({"source": name, "pairs": int(mask.sum()), "mean_score": float(vals.mean()),
                     "ci_low": lo, "ci_high": hi, "in_top_k": in_top, "top_k_share": share,
                     "top_k_share_ci_low": slo, "top_k_share_ci_high": shi,
                     "share_of_top_k": in_top / k if k else float("nan"),
                     "enrichment": share / expected if expected else float("nan"),
                     "flagged": bool(k > 0 and slo > expected)})
    rows.sort(key=lambda r: (-r["mean_score"], r["source"]))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def flagged_sources(table: Sequence[dict]) -> list[str]:
    return [r["source"] for r in table if r["flagged"]]


# ---------------------------------------------------------------------------------------------
# Mitigations


def mitigate(pairs: Sequence[dict], scores: Sequence[float], how: str, *, k: int | None = None,
             sources: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """A cleaned copy of ``pairs`` (same columns) and what was done.

    ``filter``: drop the ``k`` highest-scoring pairs. ``swap``: swap chosen and rejected of
    the ``k`` highest-scoring pairs. ``drop-sources``: drop every pair of ``sources``.
    """
    if how not in MITIGATIONS:
        raise UserError(f"unknown mitigation {how!r}: use {', '.join(MITIGATIONS)}")
    if len(scores) != len(pairs):
        raise UserError(f"{len(scores)} scores for {len(pairs)} pairs")
    info: dict[str, Any] = {"mitigation": how, "pairs_in": len(pairs)}
    if how in ("filter", "swap"):
        if k is None or k < 0:
            raise UserError(f"mitigation {how} needs k >= 0 (the number of top pairs)")
        top = top_k_mask(scores, min(int(k), len(pairs)))
        info["k"] = int(top.sum())
        if how == "filter":
            out = [dict(p) for p, t in zip(pairs, top) if not t]
        else:
            out = []
            for p, t in zip(pairs, top):
                q = dict(p)
                if t:
                    q["chosen"], q["rejected"] = p["rejected"], p["chosen"]
                out.append(q)
        info["affected"] = int(top.sum())
    else:
        drop = set(sources or [])
        info["sources"] = sorted(drop)
        out = [dict(p) for p in pairs if str(p.get("source") or "(none)") not in drop]
        info["affected"] = len(pairs) - len(out)
    if not out:
        raise UserError(f"mitigation {how} removed every pair")
    info["pairs_out"] = len(out)
    return out, info


# ---------------------------------------------------------------------------------------------
# Clusters of pair vectors


def cluster_pairs(diffs: torch.Tensor, scores: Sequence[float], pairs: Sequence[dict], *,
                  direction: Direction | None = None, k: int | None = None, k_range: tuple[int, int] = (2, 8),
                  seed: int = 0, examples: int = 3, max_dims: int = 64, n_boot: int = 1000) -> dict:
    """k-means on the unit pair vectors (after PCA to ``max_dims``); k by silhouette when None.

    Returns ``{"k", "silhouette", "labels", "centroids" (unit, activation space), "clusters"}``;
    each cluster: size, mean score with a 95% bootstrap CI, its sources, its mean silhouette
    (how well it stands apart), coherence (length of the mean unit vector: 1 = all pairs push
    the same way), the centroid's cosine with ``direction``, and the pairs nearest its centre.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_samples, silhouette_score

    x = diffs.double()
    norms = x.norm(dim=1, keepdim=True)
    keep = (norms.squeeze(1) > 0).numpy()
    unit_all = (x / norms.clamp_min(1e-30)).numpy()
    n = len(unit_all)
    if n < 3:
        raise UserError(f"clustering needs at least 3 pairs, got {n}")
    dims = int(min(max_dims, n - 1, unit_all.shape[1]))
    z = PCA(n_components=dims, random_state=seed).fit_transform(unit_all)
    candidates = [k] if k is not None else list(range(k_range[0], min(k_range[1], n - 1) + 1))
    best = None
    for kk in candidates:
        model = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(z)
        sil = float(silhouette_score(z, model.labels_, sample_size=min(n, 3000), random_state=seed)) \
            if len(set(model.labels_)) > 1 else float("nan")
        if best is None or (not math.isnan(sil) and sil > best[1]):
            best = (kk, sil, model.labels_)
    kk, sil, labels = best
    per_sample = silhouette_samples(z, labels) if len(set(labels)) > 1 else np.zeros(n)
    s = np.asarray(scores, dtype=np.float64)
    src = np.asarray(pair_sources(pairs), dtype=object)
    rng = np.random.default_rng(seed)
    clusters = []
    centroids = []
    for c in range(kk):
        members = np.flatnonzero((labels == c) & keep)
        if len(members) == 0:
            members = np.flatnonzero(labels == c)
        mean_unit = unit_all[members].mean(0)
        coherence = float(np.linalg.norm(mean_unit))
        centroid = mean_unit / max(coherence, 1e-30)
        centroids.append(centroid)
        near = members[np.argsort(-(unit_all[members] @ centroid))][:examples]
        lo, hi = _bootstrap_mean_ci(s[members], n_boot, rng)
        counts: dict[str, int] = {}
        for name in src[members]:
            counts[name] = counts.get(name, 0) + 1
        entry = {"cluster": c, "size": int(len(members)), "share": len(members) / n,
                 "mean_score": float(s[members].mean()), "ci_low": lo, "ci_high": hi,
                 "silhouette": float(per_sample[members].mean()), "coherence": coherence,
                 "sources": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                 "examples": [{"index": int(i), "prompt": pairs[i]["prompt"][:160], "chosen": pairs[i]["chosen"][:160],
                               "rejected": pairs[i]["rejected"][:160], "source": str(src[i]),
                               "score": float(s[i])} for i in near]}
        if direction is not None:
            entry["direction_cosine"] = float(centroid @ direction.vector.double().numpy())
        clusters.append(entry)
    return {"k": int(kk), "silhouette": sil, "labels": labels.astype(int),
            "centroids": torch.tensor(np.stack(centroids), dtype=torch.float32), "clusters": clusters,
            "pca_dims": dims}


def cluster_directions(clusters: dict, layer: int) -> list[Direction]:
    """Each cluster's centroid as a direction (``cluster:<i>``), for the concept audit."""
    return [Direction(f"cluster:{c['cluster']}", layer, clusters["centroids"][i], "cluster",
                      {"size": c["size"], "coherence": c["coherence"]})
            for i, c in enumerate(clusters["clusters"])]


# ---------------------------------------------------------------------------------------------
# Comparator: the judge baseline


def judge_scores(pairs: Sequence[dict], judge: Any) -> np.ndarray:
    """``judge(chosen) - judge(rejected)``: how much more the chosen response shows the behaviour."""
    from probe_dpo.judges import Judge, get_judge

    j = judge if isinstance(judge, Judge) else get_judge(judge)
    chosen = np.asarray(j.score([p["chosen"] for p in pairs]), dtype=np.float64)
    rejected = np.asarray(j.score([p["rejected"] for p in pairs]), dtype=np.float64)
    return chosen - rejected


# ---------------------------------------------------------------------------------------------
# Comparator: gradient-based attribution (LESS / LoGra style)


@dataclass
class GradientConfig:
    """The gradient comparator's settings."""

    mode: Literal["dense", "factorized"] = "dense"
    """dense: per-pair gradients of the ``params`` subset, one pair at a time, projected with a
    seeded Rademacher matrix generated chunk by chunk (LESS / TRAK). factorized: per-example
    gradients of every linear module named in ``modules``, projected as (P_out^T G P_in) with
    seeded Gaussian factors, batched through hooks (LoGra)."""
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
    max_length: int = bounded(256, ge=8)
    add_eos: bool = True
    """Append EOS to each response (as TRL's DPO does)."""
    seed: int = bounded(0, ge=0)


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
    from probe_dpo.activations import _pad_id

    cfg = cfg or GradientConfig()
    if not behaviour:
        raise UserError("gradient comparator: no behaviour examples")
    t0 = time.perf_counter()
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    completions = [c for p in pairs for c in (p["chosen"], p["rejected"])]
    b_prompts = [str(r["prompt"]) for r in behaviour]
    b_completions = [str(r.get("completion") or "") for r in behaviour]
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
            info = {"mode": "factorized", "modules": len(recorder.modules), "dim": recorder.dim, "rank": cfg.rank,
                    "parameters": int(sum(m.weight.numel() for _, m in recorder.modules))}
        else:
            raise UserError(f"gradient comparator: unknown mode {cfg.mode!r} (dense or factorized)")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    scores = cosine_scores(g_pairs, g_b)
    info.update(seconds=round(time.perf_counter() - t0, 3), pairs=len(pairs), behaviour_examples=len(behaviour))
    return scores, info


# ---------------------------------------------------------------------------------------------
# Share of a behaviour's rise removed (paired bootstrap over prompts)


def share_of_rise_removed(base: np.ndarray, raw: np.ndarray, mitigated: np.ndarray, *,
                          threshold: float = 0.5, n_boot: int = 2000, seed: int = 0) -> dict:
    """``(rate_raw - rate_mitigated) / (rate_raw - rate_base)`` with a paired 95% bootstrap CI.

    Each argument is ``[prompts, samples]`` judge scores of the same prompts (base model,
    DPO on the raw set, DPO on the mitigated set). One set of resampled prompt indices is
    applied to all three; resamples where the rise is not positive are dropped (counted in
    ``undefined_resamples``). 1.0 means the whole rise is gone; above 1, the mitigated model
    is below the base model.
    """
    def per_prompt(x):
        x = np.asarray(x, dtype=np.float64)
        return (x >= threshold).reshape(len(x), -1).mean(axis=1)

    b, r, m = per_prompt(base), per_prompt(raw), per_prompt(mitigated)
    if not len(b) == len(r) == len(m):
        raise UserError(f"share of rise removed needs the same prompts: {len(b)}, {len(r)}, {len(m)}")
    rise = r.mean() - b.mean()
    share = float((r.mean() - m.mean()) / rise) if rise > 0 else float("nan")
    idx = np.random.default_rng(seed).integers(0, len(b), size=(n_boot, len(b)))
    rb, rr, rm = b[idx].mean(1), r[idx].mean(1), m[idx].mean(1)
    ok = (rr - rb) > 0
    vals = (rr[ok] - rm[ok]) / (rr[ok] - rb[ok])
    lo, hi = (np.percentile(vals, [2.5, 97.5]) if len(vals) else (float("nan"), float("nan")))
    return {"share": share, "ci_low": float(lo), "ci_high": float(hi), "rate_base": float(b.mean()),
            "rate_raw": float(r.mean()), "rate_mitigated": float(m.mean()), "rise": float(rise),
            "undefined_resamples": int((~ok).sum()), "prompts": int(len(b))}
