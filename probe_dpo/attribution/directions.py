"""Behaviour directions and pair vectors: ``v_b`` (difference of means, a probe's direction, a
cluster centroid) and ``v_d = act(prompt, chosen) - act(prompt, rejected)``; directions as files."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from probe_dpo import storage
from probe_dpo.data import chat_value
from probe_dpo.errors import UserError
from probe_dpo.storage import artifacts, json_text

DIRECTIONS_FORMAT = "probe_dpo.directions/1"


DIRECTION_KINDS = ("diff-of-means", "probe", "cluster", "behaviour-change", "behaviour-contrast", "bank")


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


def behaviour_change(before: torch.Tensor, after: torch.Tensor, *, layer: int, name: str = "behaviour-change",
                     meta: dict | None = None) -> Direction:
    """mean(after - before): how training moved the activations of the same texts (row i of
    both is one text read by the model before and after), L2-normalised. No label and no probe.

    What it measures is representation *drift* (one text read by two models), not the behaviour:
    on the lean planted mix it ranked the poisoned pairs at chance (recall@78 0.564 against 0.549
    random). The published label-free direction is the behaviour *contrast* (two texts read by
    the model before DPO: ``probe_dpo.attribution.contrast``); this one stays as its comparison."""
    if before.shape != after.shape or len(before) == 0:
        raise UserError(f"direction {name}: needs the same non-empty texts read before and after "
                        f"(got {tuple(before.shape)} and {tuple(after.shape)})")
    shift = after.double() - before.double()
    mean = shift.mean(0)
    return Direction(name, layer, mean.float(), "behaviour-change",
                     {"texts": int(len(before)), "mean_shift_norm": float(mean.norm()),
                      "mean_row_shift_norm": float(shift.norm(dim=1).mean()), **(meta or {})})


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
        (root / "directions.json").write_text(json_text(card))
        return artifacts.publish_dir(root, uri, metadata={"kind": "directions", "count": len(directions)},
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


def check_directions(directions: Sequence[Direction], model: str, *, where: str = "directions",
                     arch: str | None = None) -> None:
    """UserError unless every direction fits ``model``: hidden size, layer range, architecture
    (``probe_dpo.model.check_fit``, the check probes get too)."""
    from probe_dpo.model import check_fit

    check_fit(directions, model, where=where, arch=arch)


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
    cols = {"prompts": [chat_value(r["prompt"]) for r in records],
            "completions": [chat_value(r.get("completion")) for r in records]}
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
