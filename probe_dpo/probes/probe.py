"""Probes as frozen modules and probe sets with roles, as files others can read.

``LinearProbe`` is a frozen ``nn.Module`` (buffers ``mean``, ``std``, ``weight``, ``bias``)
usable as a differentiable penalty: ``logits(h)`` / ``prob(h)`` for ``h[..., hidden]``.

``ProbeSet`` holds probes with roles: ``train`` probes (what fine-tuning is trained against:
one probe or an ensemble, aggregated by ``mean`` or ``max``) and ``held_out`` probes (other
layers / data that training never sees). On storage a set is a published folder:
``probeset.json`` + ``probes/<name>.safetensors`` + ``probes/<name>.json`` (the probe's card),
and for sets made by ``train_probes`` a ``report.json`` / ``report.md``. No pickle.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from probe_dpo.errors import UserError
from probe_dpo.storage import json_text

FORMAT = "probe_dpo.probeset/1"
ROLES = ("train", "held_out")

class LinearProbe(nn.Module):
    """A frozen logistic-regression probe on one layer's pooled residual stream.

    ``logits(h) = ((h - mean) / std) @ weight + bias`` for ``h`` of shape ``[..., hidden]``,
    computed in float32 (gradients flow into ``h``; the probe itself has no parameters).
    """

    def __init__(self, weight: torch.Tensor, bias: float | torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 *, layer: int, pooling: str = "mean", span: str = "response", name: str | None = None,
                 role: str = "train", card: dict | None = None):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32).reshape(-1)
        if mean.shape != weight.shape or std.shape != weight.shape:
            raise UserError(f"probe {name}: weight, mean and std must all have shape [{weight.numel()}]")
        if role not in ROLES:
            raise UserError(f"probe {name}: role must be one of {', '.join(ROLES)}, got {role!r}")
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(()).clone())
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.layer = int(layer)
        self.pooling = pooling
        self.span = span
        self.name = name or f"L{layer}"
        self.role = role
        self.card = dict(card or {})
        self.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.numel())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.hidden_size:
            raise UserError(f"probe {self.name} expects hidden size {self.hidden_size}, got features of "
                            f"size {h.shape[-1]}")
        z = (h.to(torch.float32) - self.mean) / self.std
        return z @ self.weight + self.bias

    def prob(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)

    def direction(self) -> torch.Tensor:
        """The probe's direction in raw activation space (``weight / std``), for projections."""
        return self.weight / self.std

    @classmethod
    def from_fit(cls, fit: Any, **kwargs: Any) -> "LinearProbe":
        """The probe of a ``probe_dpo.probes.fit.FitResult``."""
        return cls(fit.weight, fit.bias, fit.mean, fit.std, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous().cpu(), "bias": self.bias.reshape(1).contiguous().cpu(),
                "mean": self.mean.contiguous().cpu(), "std": self.std.contiguous().cpu()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, role={self.role!r}, layer={self.layer}, pooling={self.pooling!r}, " \
               f"hidden={self.hidden_size}"


class ProbeSet(nn.Module):
    """Probes with roles; ``score(features_by_layer, role)`` is the role's aggregated probability."""

    def __init__(self, probes: Sequence[LinearProbe], aggregation: str = "mean", meta: dict | None = None):
        super().__init__()
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise UserError(f"probe names must be unique, got {names}")
        if aggregation not in ("mean", "max"):
            raise UserError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
        sizes = {p.hidden_size for p in probes}
        if len(sizes) > 1:
            raise UserError(f"probes of one set must share a hidden size, got {sorted(sizes)}")
        self.probes = nn.ModuleList(probes)
        self.aggregation = aggregation
        self.meta = dict(meta or {})
        self.uri: str | None = None
        self.requires_grad_(False)

    def __getitem__(self, name: str) -> LinearProbe:
        for probe in self.probes:
            if probe.name == name:
                return probe
        raise KeyError(name)

    def with_role(self, role: str | None) -> list[LinearProbe]:
        if role is not None and role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return [p for p in self.probes if role is None or p.role == role]

    @property
    def train_probes(self) -> list[LinearProbe]:
        return self.with_role("train")

    @property
    def held_out_probes(self) -> list[LinearProbe]:
        return self.with_role("held_out")

    @property
    def default_probe(self) -> LinearProbe:
        """The probe used where none is named: the first train probe (else the first probe)."""
        return (self.train_probes or list(self.probes))[0]

    @property
    def hidden_size(self) -> int:
        return self.probes[0].hidden_size if len(self.probes) else int(self.meta.get("hidden_size", 0))

    def layers(self, role: str | None = None) -> list[int]:
        return sorted({p.layer for p in self.with_role(role)})

    def scores(self, features_by_layer: dict[int, torch.Tensor], role: str | None = None) -> dict[str, torch.Tensor]:
        """Each probe's probability, by name."""
        out = {}
        for probe in self.with_role(role):
            if probe.layer not in features_by_layer:
                raise UserError(f"probe {probe.name} reads layer {probe.layer}, but the features hold layers "
                                f"{sorted(features_by_layer)}")
            out[probe.name] = probe.prob(features_by_layer[probe.layer])
        return out

    def score(self, features_by_layer: dict[int, torch.Tensor], role: str = "train",
              aggregation: str | None = None) -> torch.Tensor:
        """The aggregated probability of the probes of ``role`` (differentiable in the features)."""
        probs = list(self.scores(features_by_layer, role).values())
        if not probs:
            raise UserError(f"the probe set has no {role} probes")
        stacked = torch.stack(probs, 0)
        how = aggregation or self.aggregation
        return stacked.max(0).values if how == "max" else stacked.mean(0)

    # --- compatibility ------------------------------------------------------------------------

    def check_compatible(self, model: Any, *, same_weights: bool = False) -> None:
        """UserError unless ``model`` (module or folder) fits these probes.

        The hidden size, the architecture and the layer count must match
        (``probe_dpo.model.check_fit``, from the config); with ``same_weights`` the model hash
        must too (the probes' own model, not a fine-tune: the weights are loaded for it).
        """
        from probe_dpo.model import check_fit, model_hash

        where = f"probes {self.uri}" if self.uri else "these probes"
        check_fit(self.probes, model, where=where, arch=self.meta.get("arch_hash"))
        if same_weights and self.meta.get("model_hash"):
            if not isinstance(model, nn.Module):
                from probe_dpo.model import load_model

                desc, model = str(model), load_model(model)
            else:
                desc = f"the given {type(model).__name__}"
            if model_hash(model) != self.meta["model_hash"]:
                raise UserError(f"{where} were trained on a model with model hash {self.meta['model_hash']}, but "
                                f"{desc} has model hash {model_hash(model)}")

    # --- files --------------------------------------------------------------------------------

    def card(self) -> dict:
        return {"format": FORMAT, "aggregation": self.aggregation, "hidden_size": self.hidden_size,
                **{k: v for k, v in self.meta.items() if k not in ("format", "aggregation", "hidden_size")},
                "probes": [{"name": p.name, "role": p.role, "layer": p.layer, "pooling": p.pooling,
                            "span": p.span, "tensors": f"probes/{p.name}.safetensors",
                            "card": f"probes/{p.name}.json"} for p in self.probes]}

    def save(self, uri: str, *, extra_files: dict[str, str | bytes] | None = None, overwrite: bool = True) -> dict:
        """Publish the set at ``uri`` (safetensors + JSON cards; manifest last); returns the manifest."""
        from safetensors.torch import save_file

        from probe_dpo.storage import artifacts

        with tempfile.TemporaryDirectory(prefix="probeset-") as tmp:
            root = Path(tmp)
            (root / "probes").mkdir()
            for probe in self.probes:
                save_file(probe.tensors(), str(root / "probes" / f"{probe.name}.safetensors"),
                          metadata={"format": FORMAT, "name": probe.name, "layer": str(probe.layer)})
                card = {"name": probe.name, "role": probe.role, "layer": probe.layer, "pooling": probe.pooling,
                        "span": probe.span, "hidden_size": probe.hidden_size, **probe.card}
                (root / "probes" / f"{probe.name}.json").write_text(json_text(card))
            (root / "probeset.json").write_text(json_text(self.card()))
            for rel, content in (extra_files or {}).items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            manifest = artifacts.publish_dir(root, uri, metadata={"kind": "probeset", "format": FORMAT,
                                                               "probes": len(self.probes)}, overwrite=overwrite)
        self.uri = str(uri)
        return manifest

    @classmethod
    def load(cls, uri: str) -> "ProbeSet":
        """Read a published set (safetensors + JSON only)."""
        from safetensors.torch import load

        from probe_dpo import storage

        if not storage.is_complete(uri):
            if storage.exists(storage.join(uri, "probeset.json")):
                raise UserError(f"probes {uri}: incomplete (no {storage.MANIFEST_NAME}; saving stopped half-way)")
            raise UserError(f"probes {uri}: no probe set there (no probeset.json)")
        card = storage.read_json(storage.join(uri, "probeset.json"))
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise UserError(f"probes {uri}: probeset.json is not a {FORMAT} card")
        probes = []
        for entry in card["probes"]:
            tensors = load(storage.read_bytes(storage.join(uri, entry["tensors"])))
            pcard = storage.read_json(storage.join(uri, entry["card"]))
            extra = {k: v for k, v in pcard.items()
                     if k not in ("name", "role", "layer", "pooling", "span", "hidden_size")}
            probes.append(LinearProbe(tensors["weight"], tensors["bias"][0], tensors["mean"], tensors["std"],
                                      layer=entry["layer"], pooling=entry["pooling"], span=entry["span"],
                                      name=entry["name"], role=entry["role"], card=extra))
        meta = {k: v for k, v in card.items() if k not in ("format", "aggregation", "probes")}
        out = cls(probes, aggregation=card.get("aggregation", "mean"), meta=meta)
        out.uri = str(uri)
        return out


