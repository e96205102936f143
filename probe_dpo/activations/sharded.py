"""``extract_sharded`` splits the inputs into contiguous shards and runs them on a pool of Ray
actors (one GPU each on a GPU cluster, else ``threads_per_actor`` CPUs each). Each shard is
written by its actor as one safetensors file (atomically, via ``storage.write_bytes``) in
the output folder; the folder's ``_MANIFEST.json`` (storage's artifact format, written
last) lists the shards, layers, pooling, model hash and data hash. A restart skips shards
already written by the same job (their metadata carries the job's fingerprint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from probe_dpo.activations.extract import (
    POOLINGS,
    Features,
    check_inputs,
    extract_encoded,
    inputs_hash,
    pad_token_id,
    tokenize,
)
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError


class _Extractor:
    """A Ray actor holding one copy of the model; runs shards and writes them to storage."""

    def __init__(self, model: str, dtype: str, threads: int, use_gpu: bool, env: dict | None = None):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, threads))
        from probe_dpo.model import apply_hub_env, hidden_size, load_model, load_tokenizer, model_hash, num_layers

        apply_hub_env(env)  # a hub id resolves in the driver's Hugging Face cache

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_model(model, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(model)
        self.info_ = {"model_hash": model_hash(self.model), "num_layers": num_layers(self.model),
                      "hidden_size": hidden_size(self.model), "device": device,
                      "threads": torch.get_num_threads()}

    def info(self) -> dict:
        return self.info_

    def run(self, task: dict) -> dict:
        from safetensors.torch import save

        from probe_dpo import storage

        stats: dict = {}
        t0 = time.perf_counter()
        encoded = tokenize(self.tokenizer, task.get("texts"), prompts=task.get("prompts"),
                           completions=task.get("completions"), span=task["span"],
                           max_length=task["max_length"])
        feats = extract_encoded(self.model, encoded, task["layers"], task["pooling"], task["batch_size"],
                                 task["stop_early"], pad_token_id(self.tokenizer), stats, t0)
        data = save(_to_tensors(feats, task["pooling"]),
                    metadata={"fingerprint": task["fingerprint"], "start": str(task["start"]),
                              "end": str(task["end"])})
        storage.write_bytes(task["uri"], data)
        return {"name": task["name"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "tokens": stats["tokens"], "padded_tokens": stats["padded_tokens"],
                "empty_spans": stats["empty_spans"], "seconds": time.perf_counter() - t0}


def _to_tensors(feats: Features, pooling: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, value in feats.items():
        if pooling == "none":
            out[f"layer.{layer}"] = torch.cat(value, 0).contiguous() if value else torch.zeros(0, 0)
            if "offsets" not in out:
                out["offsets"] = torch.tensor([0] + [len(v) for v in value]).cumsum(0)
        else:
            out[f"layer.{layer}"] = value.contiguous()
    return out


def _from_tensors(tensors: dict[str, torch.Tensor], layers: Sequence[int], pooling: str) -> Features:
    out: Features = {}
    for layer in layers:
        value = tensors[f"layer.{layer}"]
        if pooling == "none":
            offsets = tensors["offsets"].tolist()
            out[layer] = [value[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        else:
            out[layer] = value
    return out


def _config_layer_count(model: str) -> int | None:
    from probe_dpo.model import model_facts

    try:
        return model_facts(model)["num_layers"]
    except UserError:
        return None


class ExtractorPool:
    """Ray actors each holding a copy of ``model``, reusable across ``extract_sharded`` calls.

    Starting an actor (a process importing torch and loading the model) costs seconds, so
    extracting several splits through one pool pays it once. Use it as a context manager or
    call ``close()``: the actors hold their CPUs/GPUs until then. On a cluster with GPUs each
    actor takes one GPU (``actors`` defaults to the GPU count); otherwise
    ``threads_per_actor`` CPUs (``actors`` defaults to 2).
    """

    def __init__(self, model: str, *, actors: int | None = None, threads_per_actor: int = 1,
                 use_gpu: bool | None = None, address: str | None = None, dtype: str = "float32"):
        import ray

        from probe_dpo.ray_utils import cluster_gpus, gpu_actors, init_ray, unwrap_ray_error

        if threads_per_actor < 1:
            raise UserError(f"threads_per_actor must be >= 1, got {threads_per_actor}")
        if actors is not None and actors < 1:
            raise UserError(f"actors must be >= 1, got {actors}")
        init_ray(address)
        gpus = cluster_gpus()
        if use_gpu is None:
            use_gpu = gpus > 0
        if actors is None:
            actors = max(1, gpus) if use_gpu else 2
        elif use_gpu:
            actors = gpu_actors(actors, gpus, "extraction")
        if dtype == "auto":
            dtype = "bfloat16" if use_gpu else "float32"
        self.model, self.dtype, self.use_gpu = str(model), dtype, use_gpu
        self.threads_per_actor = threads_per_actor
        t0 = time.perf_counter()
        remote_cls = ray.remote(num_cpus=0 if use_gpu else threads_per_actor,
                                num_gpus=1 if use_gpu else 0)(_Extractor)
        from probe_dpo.model import hub_env

        self.actors = [remote_cls.remote(self.model, dtype, threads_per_actor, use_gpu, hub_env())
                       for _ in range(actors)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except Exception as exc:  # noqa: BLE001 - a UserError raised while loading the model
            self.close()
            raise unwrap_ray_error(exc) from None
        if len({i["model_hash"] for i in infos}) != 1:
            self.close()
            raise UserError(f"the actors loaded different models from {model}: it changed during start-up")
        self.info = infos[0]
        self.startup_s = time.perf_counter() - t0

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "ExtractorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def shards_folder(out: str | None, prefix: str = "probe-dpo-activations-") -> Iterator[str]:
    """``out`` when the caller keeps the shards, else a temporary folder removed afterwards.

    ``extract_sharded`` returns the features in memory; its shards only need to outlive the
    call when someone wants to resume or inspect them.
    """
    if out is not None:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


def extract_sharded(model: str, out: str, texts: Sequence[str] | None = None, *,
                    prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None,
                    layers: Sequence[int], pooling: str = "mean", span: str | None = None,
                    batch_size: int = 16, max_length: int = 512, shard_size: int = 512,
                    actors: int | None = None, threads_per_actor: int = 1, use_gpu: bool | None = None,
                    address: str | None = None, dtype: str = "float32", stop_early: bool = True,
                    overwrite: bool = False, load: bool = True, pool: ExtractorPool | None = None,
                    progress: Callable[[dict], None] | None = None) -> Features | dict:
    """``extract`` split over a pool of Ray actors, streamed to ``out`` as safetensors shards.

    ``model`` is a model folder or URI (each actor loads its own copy). Ray is started or
    joined at ``address`` (``None``: reuse the running one, else start a local one). The
    actors come from ``pool`` (an ``ExtractorPool`` of the same model, kept open) or are
    started for this call (``actors``, ``threads_per_actor``, ``use_gpu``: see
    ``ExtractorPool``) and stopped at its end. Shards already written by the same job are
    skipped; a complete folder from the same job is loaded as it is. A complete folder from
    a different job needs ``overwrite=True``.

    Returns the features (same layout as ``extract``), or with ``load=False`` the manifest
    (with ``"reused": True`` when the folder was already complete). ``progress`` is called
    with each finished shard's info.
    """
    from ray.util import ActorPool

    from probe_dpo import storage
    from probe_dpo.model import resolve_layers
    from probe_dpo.ray_utils import unwrap_ray_error

    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    span, n = check_inputs(texts, prompts, completions, span)
    if n == 0:
        raise UserError("nothing to extract: no inputs")
    count = _config_layer_count(model)  # a wrong layer is refused before Ray starts (it did only on GPU boxes)
    layer_ids = resolve_layers(count, layers) if count is not None else list(layers)
    if dtype == "auto":  # bf16 on GPU actors, fp32 on CPUs (the probe math is fp32 either way)
        if pool is not None:
            dtype = pool.dtype
        else:
            from probe_dpo.ray_utils import init_ray, resolve_use_gpu

            init_ray(address)
            use_gpu = resolve_use_gpu("auto") if use_gpu is None else use_gpu
            dtype = "bfloat16" if use_gpu else "float32"
    if pool is not None and (pool.model != str(model) or pool.dtype != dtype):
        raise UserError(f"the extractor pool holds {pool.model} ({pool.dtype}), not {model} ({dtype})")
    stamp = model_files_stamp(str(model))
    data_hash = inputs_hash(texts, prompts, completions)
    if count is not None and stamp is not None and storage.is_complete(out):
        # Already complete for this very model folder (unchanged files) and job: no actors needed.
        manifest = storage.read_manifest(out)
        old = manifest.get("metadata", {})
        same = {"data_hash": data_hash, "layers": layer_ids, "pooling": pooling, "span": span,
                "max_length": max_length, "shard_size": shard_size, "dtype": dtype, "n": n,
                "model": str(model), "model_stamp": stamp}
        if all(old.get(k) == v for k, v in same.items()):
            return load_activations(out)[0] if load else {**manifest, "reused": True}
    t_start = time.perf_counter()
    own_pool = pool is None
    if own_pool:
        pool = ExtractorPool(str(model), actors=actors, threads_per_actor=threads_per_actor, use_gpu=use_gpu,
                             address=address, dtype=dtype)
    try:
        info = pool.info
        n_shards = math.ceil(n / shard_size)
        layer_ids = resolve_layers(info["num_layers"], layer_ids)
        settings = {"model_hash": info["model_hash"], "data_hash": data_hash,
                    "layers": layer_ids, "pooling": pooling, "span": span, "max_length": max_length,
                    "shard_size": shard_size, "dtype": dtype, "n": n}
        fingerprint = json_digest(settings)
        shards = [{"name": f"shard-{k:05d}.safetensors", "start": k * shard_size,
                   "end": min(n, (k + 1) * shard_size)} for k in range(n_shards)]
        metadata = {"kind": "activations", **settings, "fingerprint": fingerprint, "model": str(model),
                    "model_stamp": stamp, "hidden_size": info["hidden_size"], "shards": shards}
        if storage.is_complete(out):
            old = storage.read_manifest(out).get("metadata", {})
            if old.get("fingerprint") == fingerprint:
                return load_activations(out)[0] if load else {**storage.read_manifest(out), "reused": True}
            if not overwrite:
                raise UserError(f"{out} already holds activations of another extraction (model, data or "
                                f"settings differ): choose another output or pass overwrite")
            storage.remove(storage.join(out, storage.MANIFEST_NAME))
        files: dict[str, dict] = {}
        existing = set(storage.list_dir(out))
        tasks = []
        for shard in shards:
            uri = storage.join(out, shard["name"])
            if shard["name"] in existing:
                done = _shard_file_entry(uri, fingerprint)
                if done is not None:
                    files[shard["name"]] = done
                    continue
            task = {**shard, "uri": uri, "fingerprint": fingerprint, "layers": layer_ids, "pooling": pooling,
                    "span": span, "max_length": max_length, "batch_size": batch_size, "stop_early": stop_early}
            sl = slice(shard["start"], shard["end"])
            if texts is not None:
                task["texts"] = list(texts[sl])
            else:
                task["prompts"], task["completions"] = list(prompts[sl]), list(completions[sl])
            tasks.append(task)
        skipped = len(files)
        totals = {"tokens": 0, "padded_tokens": 0, "empty_spans": 0}
        try:
            for result in ActorPool(pool.actors).map_unordered(lambda a, t: a.run.remote(t), tasks):
                files[result["name"]] = {"bytes": result["bytes"], "sha256": result["sha256"]}
                for key in totals:
                    totals[key] += result[key]
                if progress is not None:
                    progress(result)
        except Exception as exc:  # noqa: BLE001
            raise unwrap_ray_error(exc) from None
        metadata["run"] = {"actors": len(pool.actors), "threads_per_actor": pool.threads_per_actor,
                           "use_gpu": pool.use_gpu, "device": info["device"], "shards_written": len(tasks),
                           "shards_skipped": skipped, "actor_startup_s": round(pool.startup_s, 3),
                           "seconds": round(time.perf_counter() - t_start, 3), **totals}
        import datetime

        manifest = {"files": {name: files[name] for name in sorted(files)}, "metadata": metadata,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        storage.write_json(storage.join(out, storage.MANIFEST_NAME), manifest)
    finally:
        if own_pool:
            pool.close()
    return load_activations(out)[0] if load else manifest


def model_files_stamp(model: str) -> str | None:
    """A cheap identity of a model folder's files (names, sizes, mtimes; a remote artifact's
    manifest); None for a hub id. Lets a complete extraction be recognised without actors."""
    import os

    from probe_dpo import storage

    try:
        if "://" in model:
            if not storage.is_complete(model):
                return None
            files = storage.read_manifest(model)["files"]
            return json_digest(files)
        if not os.path.isdir(model):
            return None
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(model) if e.is_file())
        return json_digest([os.path.abspath(model), entries])
    except (OSError, UserError):
        return None


def _shard_file_entry(uri: str, fingerprint: str) -> dict | None:
    """``{"bytes", "sha256"}`` of a shard written by the job ``fingerprint``; None otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from probe_dpo import storage

    data = storage.read_bytes(uri)
    try:
        meta = _safetensors_metadata(data)
        load(data)
    except (SafetensorError, ValueError, KeyError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _safetensors_metadata(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return header.get("__metadata__", {}) or {}


def load_activations(uri: str, layers: Sequence[int] | None = None) -> tuple[Features, dict]:
    """The features (in input order) and the manifest metadata of a complete extraction.

    Every shard is checked against the manifest (size and sha256) before it is parsed, so a
    damaged or half-replaced shard is one line naming it, never wrong features.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from probe_dpo import storage
    from probe_dpo.storage import artifacts

    manifest = storage.read_manifest(uri)
    meta = manifest.get("metadata", {})
    if meta.get("kind") != "activations":
        raise UserError(f"{uri} is not an activations folder (its manifest has kind {meta.get('kind')!r})")
    wanted = list(meta["layers"]) if layers is None else [int(x) for x in layers]
    missing = [x for x in wanted if x not in meta["layers"]]
    if missing:
        raise UserError(f"{uri} has no activations for layer(s) {missing}: it holds layers {meta['layers']}")
    unlisted = [s["name"] for s in meta["shards"] if s["name"] not in manifest["files"]]
    if unlisted:
        raise UserError(f"{uri}: shard(s) {', '.join(unlisted[:3])} are in its metadata but not in its "
                        f"{storage.MANIFEST_NAME} files: the extraction is damaged; extract again")
    parts: list[Features] = []
    for shard in meta["shards"]:
        data = artifacts.read_member(uri, shard["name"], manifest)  # size and sha256 checked
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as exc:
            raise UserError(f"{storage.join(uri, shard['name'])}: not a readable safetensors file ({exc})") from None
        parts.append(_from_tensors(tensors, wanted, meta["pooling"]))
    feats: Features = {}
    for layer in wanted:
        if meta["pooling"] == "none":
            feats[layer] = [t for part in parts for t in part[layer]]
        else:
            feats[layer] = torch.cat([part[layer] for part in parts], 0)
    return feats, meta
