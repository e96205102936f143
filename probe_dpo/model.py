"""Loading models and reaching into their residual stream.

Decoder layers are found by index for the common causal-LM layouts (Llama/Qwen/Mistral
``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``, and a few more),
through the wrappers training puts around a model: PEFT (``get_base_model``), DeepSpeed
engines and DDP (``.module``) and ``torch.compile`` (``_orig_mod``).

"The residual stream at layer i" is the output of decoder layer i (0-based; negative
indices count from the end), read with a forward hook. This is ``hidden_states[i + 1]``
of ``output_hidden_states=True`` except for the last layer, where Hugging Face applies the
final norm and the hook does not.

``model_hash`` fingerprints a model (architecture + a sample of its weights) so a probe
card records which model it was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from probe_dpo.data import json_digest
from probe_dpo.errors import UserError

# Attribute paths, tried in order, from the unwrapped model to its decoder-layer list.
LAYER_PATHS = (
    "model.layers",            # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, SmolLM
    "transformer.h",           # GPT-2, GPT-J, GPT-Neo, Falcon, BLOOM
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "model.decoder.layers",    # OPT
    "model.language_model.layers",  # multimodal wrappers around a text decoder
    "transformer.blocks",      # MPT
    "layers",                  # a bare decoder (LlamaModel, ...)
    "h",                       # a bare GPT2Model
)

# Config keys that describe the architecture (not the weights) in the hash.
_ARCH_KEYS = ("model_type", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
              "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner",
              "vocab_size", "max_position_embeddings", "n_positions", "rope_theta", "tie_word_embeddings")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def unwrap_model(model: Any) -> nn.Module:
    """The plain Hugging Face model inside PEFT / DeepSpeed / DDP / torch.compile wrappers."""
    for _ in range(10):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()          # peft.PeftModel -> the (LoRA-injected) base
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod                  # torch.compile
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module                     # DeepSpeedEngine, DistributedDataParallel
        else:
            return model
    return model


def get_layers(model: Any) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (wrappers are looked through)."""
    base = unwrap_model(model)
    for path in LAYER_PATHS:
        node: Any = base
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise UserError(f"cannot find the decoder layers of {type(base).__name__}: "
                    f"none of {', '.join(LAYER_PATHS)} is a list of layers")


def num_layers(model: Any) -> int:
    return len(get_layers(model))


def hidden_size(model: Any) -> int:
    config = getattr(unwrap_model(model), "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    embed = unwrap_model(model).get_input_embeddings()
    return int(embed.weight.shape[1])


def resolve_layer(model_or_count: Any, index: int) -> int:
    """A layer index (negative counts from the end) as a non-negative index, or a UserError."""
    count = model_or_count if isinstance(model_or_count, int) else num_layers(model_or_count)
    if isinstance(index, bool) or not isinstance(index, int):
        raise UserError(f"layer {index!r} is not an integer index")
    if not -count <= index < count:
        raise UserError(f"layer {index} is out of range: the model has {count} layers "
                        f"(valid indices 0..{count - 1}, or -{count}..-1 from the end)")
    return index % count


def resolve_layers(model_or_count: Any, indices: Iterable[int]) -> list[int]:
    """Resolved, de-duplicated layer indices in the order given."""
    out: list[int] = []
    for index in indices:
        layer = resolve_layer(model_or_count, index)
        if layer not in out:
            out.append(layer)
    if not out:
        raise UserError("no layers given: name at least one layer index")
    return out


def get_layer(model: Any, index: int) -> nn.Module:
    layers = get_layers(model)
    return layers[resolve_layer(len(layers), index)]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the deepest needed layer has run."""


@contextlib.contextmanager
def residual_hooks(model: Any, layers: Iterable[int], *, detach: bool = True, stop_after: bool = False,
                   only_with_grad: bool = False, accumulate: bool = False) -> Iterator[dict[int, Any]]:
    """Record the residual stream (output of decoder layer i) of each forward pass.

    Yields a dict ``{layer: tensor [batch, seq, hidden]}`` refreshed by every forward pass
    of the model. ``detach=False`` keeps the graph (for a differentiable penalty);
    ``only_with_grad`` records only passes run with gradients enabled (skips a reference
    model's no-grad pass in DPO). ``stop_after`` raises ``StopForward`` once the deepest
    requested layer has run: wrap the forward call in ``try/except StopForward`` (what
    ``forward_until`` does) to skip the layers above it. ``accumulate`` keeps every pass's tensor
    in a list per layer instead (a caller that runs one batch in chunks, as TRL's scoring does).
    """
    all_layers = get_layers(model)
    wanted = resolve_layers(len(all_layers), layers)
    deepest = max(wanted)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            if only_with_grad and not torch.is_grad_enabled():
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            hidden = hidden.detach() if detach else hidden
            if accumulate:
                store.setdefault(index, []).append(hidden)
            else:
                store[index] = hidden
            if stop_after and index == deepest:
                raise StopForward
        return hook

    try:
        for index in wanted:
            handles.append(all_layers[index].register_forward_hook(make_hook(index)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: Any, layers: Iterable[int], stop_early: bool = True,
                  **inputs: Any) -> dict[int, torch.Tensor]:
    """Run the model on ``inputs`` and return the residual stream of ``layers``.

    With ``stop_early`` the layers above the deepest requested one (and the LM head) are
    skipped. Call it inside ``torch.inference_mode()`` for extraction.
    """
    base = unwrap_model(model)
    # The decoder body (no LM head) when the model exposes one: saves the vocab projection.
    runner = base.get_decoder() if _has_decoder(base) else base
    with residual_hooks(model, layers, stop_after=stop_early) as store:
        try:
            runner(**inputs, use_cache=False)
        except StopForward:
            pass
    return dict(store)


def _has_decoder(base: nn.Module) -> bool:
    try:
        decoder = base.get_decoder()
    except Exception:  # noqa: BLE001 - some models raise instead of returning None
        return False
    return isinstance(decoder, nn.Module) and decoder is not base


def load_model(path_or_id: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None) -> nn.Module:
    """A causal LM from a ``save_pretrained`` folder, an s3:// URI of one, or a hub id
    (``model_dir``: the Hugging Face cache and offline mode are honoured).

    Failures (missing folder, no weights, an unknown architecture, weights whose shapes do
    not fit the config, a weight or config file that does not match the manifest it was
    published with) are a UserError that names the path. The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = _local_model_path(path_or_id)
    torch_dtype = _dtype(dtype)
    if os.path.isdir(local):
        from probe_dpo.storage import artifacts

        artifacts.verify_files(local)  # a published folder: its weights and configs are what was published
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr: errors stay one line
    try:
        with _load_report() as report:
            model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, EnvironmentError) as exc:
        raise UserError(f"cannot load a model from {path_or_id}: {_first_line(exc)}") from None
    except RuntimeError as exc:  # transformers raises these for weights that do not fit the model
        raise UserError(f"cannot load a model from {path_or_id}: {_mismatch(report) or _first_line(exc)}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device is not None:
        model.to(device)
    model.eval()
    return model


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """Hold back what transformers logs while loading (its multi-line LOAD REPORT table) and
    pass it on after a successful load; after a failure the caller turns it into one line."""
    import logging

    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    texts: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            texts.append(record.getMessage())

    root = hf_logging.get_logger()
    keep = Keep(logging.WARNING)
    hf_logging.disable_default_handler()
    root.addHandler(keep)
    try:
        yield texts
    finally:
        root.removeHandler(keep)
        hf_logging.enable_default_handler()
    for record in records:  # only reached after a successful load
        root.handle(record)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISMATCH = re.compile(r"^[ \t]*(\S[^|\n]*?)[ \t]*\|[ \t]*MISMATCH[ \t]*\|[^\n]*?ckpt: torch\.Size\((\[[^\]]*\])\) "
                       r"vs model:[ \t]*torch\.Size\((\[[^\]]*\])\)", re.M)


def _mismatch(report: list[str]) -> str | None:
    """One line out of transformers' load report: the first weight whose shape does not fit."""
    text = _ANSI.sub("", "\n".join(report))
    found = _MISMATCH.findall(text)
    if not found:
        return None
    key, ckpt, model = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (f"weight {key} has shape {ckpt} in the checkpoint but {model} in the model its config.json "
            f"describes{more}: the weights and config.json come from different models")


def load_tokenizer(path_or_id: str | os.PathLike):
    """The tokenizer saved with a model (UserError naming the path when there is none)."""
    from transformers import AutoTokenizer

    local = _local_model_path(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {path_or_id}: {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def _local_model_path(path_or_id: str | os.PathLike) -> str:
    """A local folder holding the model ``path_or_id`` names (see ``model_dir``)."""
    return model_dir(path_or_id)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def is_hub_id(text: str) -> bool:
    """True for a Hugging Face model id (``name``, ``org/name``, optionally ``@revision``) that is
    not a local path."""
    local = os.path.expanduser(text)
    return bool(_HUB_ID.match(text)) and not os.path.exists(local) and not text.startswith((".", "/", "~"))


HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_env() -> dict[str, str]:
    """This process's Hugging Face cache and offline settings, to send with a job: the workers of
    a Ray cluster started earlier did not inherit them (``apply_hub_env`` sets them there)."""
    return {k: os.environ[k] for k in HUB_ENV if os.environ.get(k)}


def apply_hub_env(env: dict[str, str] | None) -> None:
    for key, value in (env or {}).items():
        if key in HUB_ENV:
            os.environ[key] = value


def model_dir(path_or_id: str | os.PathLike) -> str:
    """A local folder for a model given as a ``save_pretrained`` folder, a URI of one (``s3://``:
    a folder this project published, or any folder someone else wrote there, manifest or not) or
    a Hugging Face id (``org/name`` or ``org/name@revision``).

    A hub id goes through ``huggingface_hub.snapshot_download``, so the Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``) and offline mode (``HF_HUB_OFFLINE=1``: the cached snapshot
    of ``refs/<revision>``, no network) are honoured. UserError (one line) when nothing is there.
    """
    text = str(path_or_id)
    if "://" in text:
        from probe_dpo import storage
        from probe_dpo.storage import artifacts

        if not storage.exists(text):
            raise UserError(f"cannot load a model from {text}: nothing is stored there")
        if storage.is_complete(text):
            return str(artifacts.fetch_dir(text))
        return str(artifacts.fetch_folder(text))  # a folder written without our manifest
    local = os.path.expanduser(text)
    if os.path.isdir(local):
        return local
    if text.startswith((".", "/", "~")) or not is_hub_id(text):
        raise UserError(f"cannot load a model from {text}: no such folder")
    return _hub_snapshot(text)


def _hub_snapshot(text: str) -> str:
    """The local snapshot folder of a hub model id (downloaded unless offline; cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = text.partition("@")
    # read at call time (huggingface_hub reads them once, at import; a Ray worker may have
    # imported it before the job's settings arrived: see hub_env)
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.path.expanduser(home), "hub") if home else None)
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        return snapshot_download(repo_id=repo, revision=revision or None, cache_dir=cache, local_files_only=offline,
                                 ignore_patterns=["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "original/*"])
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        raise UserError(f"cannot load a model from {text}: not a local folder, and hub id {repo!r} is not in the "
                        f"Hugging Face cache ({cache or constants.HF_HUB_CACHE})"
                        + (" while offline (HF_HUB_OFFLINE=1)" if offline else "")) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from {text}: {_first_line(exc)}") from None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def arch_hash(model_or_dir: Any) -> str:
    """A short hash of the architecture only (config keys that fix the shapes)."""
    config = _config_dict(model_or_dir)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    arch = {key: text_config.get(key) for key in _ARCH_KEYS if key in text_config}
    return json_digest(arch)


def model_hash(model_or_dir: Any, *, max_elements: int = 1 << 16) -> str:
    """A fingerprint of a model: its architecture, parameter names/shapes and weight samples.

    Takes a module (wrappers are looked through) or a model folder/URI (loaded on CPU).
    Values are rounded to bfloat16 before hashing so the same checkpoint loaded in fp32 or
    bf16 gives the same hash; any real weight change (a fine-tuning step) changes it. The
    embeddings and the first, middle and last decoder layers are sampled (a strided
    slice of at most ``max_elements`` values per tensor), so hashing costs milliseconds.
    """
    model = model_or_dir
    if not isinstance(model_or_dir, nn.Module):
        model = load_model(model_or_dir)
    base = unwrap_model(model)
    digest = hashlib.sha256(arch_hash(base).encode())
    layers = get_layers(base)
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    tensors: list[tuple[str, torch.Tensor]] = [("embed", base.get_input_embeddings().weight)]
    for i in picks:
        for name, param in sorted(layers[i].named_parameters()):
            tensors.append((f"layer{i}.{name.replace('.base_layer', '')}", param))
    shapes = [(name, tuple(t.shape)) for name, t in tensors]
    digest.update(json.dumps(shapes).encode())
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // max_elements)
            sample = flat[::step][:max_elements].to("cpu", torch.float32).to(torch.bfloat16)
            digest.update(name.encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _config_dict(model_or_dir: Any) -> dict[str, Any]:
    if isinstance(model_or_dir, nn.Module):
        config = getattr(unwrap_model(model_or_dir), "config", None)
        if config is None:
            raise UserError(f"{type(model_or_dir).__name__} has no config to fingerprint")
        return config.to_dict()
    local = Path(_local_model_path(model_or_dir))
    try:
        return json.loads((local / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {local / 'config.json'}: {_first_line(exc)}") from None


def model_facts(model_or_dir: Any) -> dict[str, Any]:
    """``hidden_size``, ``num_layers`` and ``arch_hash`` from a model's config alone (no weights
    are loaded); the first two None where the config does not say (multimodal configs keep them
    in ``text_config``)."""
    config = _config_dict(model_or_dir)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = next((text[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(text.get(k), int)), None)
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)),
                  None)
    return {"hidden_size": hidden, "num_layers": layers, "arch_hash": arch_hash(model_or_dir)}


def check_fit(readers: Iterable[Any], model: Any, *, where: str, arch: str | None = None) -> None:
    """The one answer to "do these probes (or directions) fit this model?": UserError unless each
    reader (``name``, ``layer``, ``hidden_size``: a probe or a direction) reads a layer the model
    has, at its hidden size, and, given the architecture hash they were made on (``arch``), the
    model has that architecture. Read from the config alone (a folder/URI, or a loaded module's
    config), so it runs before any weights load; what the config does not say is not checked."""
    facts = model_facts(model)
    desc = f"model {model}" if isinstance(model, (str, Path)) else f"the given {type(model).__name__}"
    size, count = facts["hidden_size"], facts["num_layers"]
    for r in readers:
        if size is not None and r.hidden_size != size:
            raise UserError(f"{where}: {r.name} reads hidden size {r.hidden_size}, but {desc} has hidden size {size}: "
                            "they come from another model")
        if count is not None and not 0 <= r.layer < count:
            raise UserError(f"{where}: {r.name} reads layer {r.layer}, but {desc} has layers 0..{count - 1}")
    if arch and arch != facts["arch_hash"]:
        raise UserError(f"{where} come from a different architecture ({arch}) than {desc} ({facts['arch_hash']})")


def source_dtype(model_or_dir: Any) -> str:
    """The dtype a model was saved in (``config.json``'s ``dtype``/``torch_dtype``), as a name
    ``load_model`` takes; float32 when the config does not say or names another."""
    config = _config_dict(model_or_dir)
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"
