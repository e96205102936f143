"""Moving bytes safely: one small API over local folders and ``s3://`` URIs (fsspec / s3fs).

Every function takes a URI: a local path (``runs/x``, ``/abs/x``, ``file:///abs/x``) or a
remote one (``s3://bucket/prefix/x``; other fsspec protocols work through fsspec).

Guarantees
- ``write_bytes`` is atomic: a reader sees the old content or the new, never a partial file
  (local: a temporary sibling file, fsync, ``os.replace``; S3: one PUT, or one multipart
  upload that becomes visible only when it completes).
- An *artifact* is a folder published with ``publish_dir``; its manifest (``_MANIFEST.json``:
  size and sha256 of every file) says what it holds. Publishing never destroys the version
  readers get until the new one is whole: the new version is written beside the old one
  and made current by ONE atomic pointer write, and only then is the old one deleted.
  - local: the new version is staged in a hidden sibling folder and swapped with the old
    folder in one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames, with a
    moment where the folder is missing); artifacts stay plain folders any tool can open.
  - S3 (no atomic rename of a prefix): the files go to ``<prefix>/_v/<version>/`` and the
    manifest ``<prefix>/_MANIFEST.json``, written last in one PUT, is the pointer: it names
    the version (``"files_at": "_v/<version>"``). Old versions are deleted after that PUT.
  A publisher killed between any two steps leaves readers the complete old version or the
  complete new one. One publisher at a time holds the artifact's writer lease
  (``probe_dpo.storage.lease``); a second one fails with one line naming the holder.
- Readers verify: ``read_bytes`` (and ``read_text``/``read_json``) of a file inside a published
  artifact finds the artifact's manifest, reads the current version's bytes and checks size
  and sha256, refusing a damaged file with one line naming it; ``fetch_dir`` checks sizes of
  a local artifact (hashes are checked when a file is loaded) and size and sha256 of every
  file it downloads.
- Errors a user can fix (missing file, missing bucket, no permission, unreachable endpoint,
  no credentials, any other S3 error) raise ``UserError`` with one line naming the URI (and
  the endpoint for S3). Unreachable endpoints fail after a bounded number of attempts with
  a short connect timeout.

S3 settings come from the environment, so Ray workers started after them see the same ones:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``PROBE_DPO_S3_MAX_ATTEMPTS`` (default 3),
``PROBE_DPO_S3_CONNECT_TIMEOUT`` (seconds, default 3). ``configure(...)`` sets them. Credentials
come only from the environment (``AWS_*`` variables, the usual AWS config files, an instance
role): they are never arguments, never logged, and scrubbed from any error text.

No module state beyond a per-process cache of filesystem objects (keyed by process id and
settings), so functions using this module can be shipped to Ray workers.

The package: this module reads and writes; ``artifacts`` publishes and fetches versioned
folders; ``lease`` is the writer lease; ``backends`` builds the filesystems and turns their
errors into one line. The lower-level names here (``raw_read``, ``write_local``, ``member_uri``...)
are the building blocks ``artifacts`` and ``lease`` share with this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from probe_dpo.errors import UserError
from probe_dpo.storage import backends
from probe_dpo.storage.backends import LOCAL_PROTOCOLS, is_remote, protocol_of, s3_filesystem, storage_errors

MANIFEST_NAME = "_MANIFEST.json"
PUBLISHING_NAME = "_PUBLISHING"  # written by older versions of this module while publishing to S3
VERSIONS_DIR = "_v"  # S3: <prefix>/_v/<version>/ holds each version's files
LEASE_NAME = "_LEASE"  # S3: <prefix>/_LEASE is the writer lease (probe_dpo.storage.lease)
# Hidden siblings that this module creates (and hides from list_dir): ".<name>.tmp-<hex>"
# (a file or folder being written), ".<name>.old-<hex>" (a replaced version being deleted) and
# ".<name>.lease" (a local writer lease).
_TEMP_RE = re.compile(r"^\..+\.((tmp|old)-[0-9a-f]{12}|lease)$")


configure = backends.configure  # this process's S3 settings: probe_dpo.storage.backends.configure


class ArtifactExists(UserError):
    """``publish_dir`` was asked to replace a complete artifact without ``overwrite=True``."""


# ---------------------------------------------------------------------------------------------
# Settings and filesystems


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (``~`` expanded); URIs and ``None`` unchanged.

    Workflows call it on their configs' paths before Ray sees them: Ray workers and Tune
    trials run in other working directories, where a relative path means something else.
    """
    if uri is None or is_remote(os.fspath(uri)) or os.fspath(uri).startswith("file://"):
        return uri
    return local_path(uri)


def local_path(uri: str) -> str:
    _, path = fsspec.core.split_protocol(os.fspath(uri))
    return os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    uri = os.fspath(uri)
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        return LocalFileSystem(), local_path(uri)
    if protocol in ("s3", "s3a"):
        return s3_filesystem(), uri.split("://", 1)[1].strip("/")
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI (``s3://b/p`` or a local path); parts never reset the base."""
    base = os.fspath(base)
    parts = [p.strip("/") for p in parts if p and p.strip("/")]
    if not parts:
        return base
    if is_remote(base) or base.startswith("file://"):
        return base.rstrip("/") + "/" + "/".join(parts)
    return os.path.join(base, *parts)


def pyarrow_filesystem(uri: str):
    """A (pyarrow filesystem, path) pair for ``ray.train.RunConfig(storage_path=, storage_filesystem=)``."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------
# Errors


# ---------------------------------------------------------------------------------------------
# Files


def temp_sibling(path: str, kind: str = "tmp") -> str:
    head, name = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{name}.{kind}-{uuid.uuid4().hex[:12]}")


def write_local(path: str, chunks) -> None:
    """Write chunks to a temporary sibling, fsync, then rename over ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def raw_read(uri: str) -> bytes:
    """The bytes stored at ``uri`` itself (no artifact resolution, no verification)."""
    with storage_errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            return Path(path).read_bytes()
        return fs.cat_file(path)


def _raw_exists(uri: str) -> bool:
    with storage_errors(uri):
        fs, path = filesystem(uri)
        return fs.exists(path)


def _enclosing_artifact(uri: str, include_self: bool = False) -> tuple[str, str, dict] | None:
    """``(artifact uri, path inside it, manifest)`` of the nearest published artifact holding ``uri``.

    Walks up from ``uri``'s folder (from ``uri`` itself with ``include_self``) looking for a
    manifest: a few ``stat`` calls locally, one small GET per level on S3 (never the bucket
    root, where nothing is published).
    """
    fs, path = filesystem(uri)
    remote = is_remote(uri)
    parts = path.rstrip("/").split("/")
    lowest = 2 if remote else 1
    for i in range(len(parts) if include_self else len(parts) - 1, lowest - 1, -1):
        root_path = "/".join(parts[:i]) or "/"
        candidate = f"{root_path.rstrip('/')}/{MANIFEST_NAME}"
        if not remote and not os.path.isfile(candidate):
            continue
        with storage_errors(uri):
            try:
                body = Path(candidate).read_bytes() if not remote else fs.cat_file(candidate)
            except FileNotFoundError:
                continue
        rel = "/".join(parts[i:])
        root_uri = _ancestor_uri(uri, root_path, len(parts) - i)
        manifest = parse_manifest(body, root_uri)
        files_at = manifest.get("files_at")
        if files_at and rel.startswith(files_at + "/"):
            rel = rel[len(files_at) + 1:]  # a version folder's own path: the same member
        return root_uri, rel, manifest
    return None


def _ancestor_uri(uri: str, root_path: str, levels: int) -> str:
    """``uri`` with ``levels`` trailing components removed, in the caller's spelling when possible."""
    pieces = uri.rstrip("/").split("/")
    if levels == 0:
        return uri.rstrip("/")
    if "." in pieces or ".." in pieces or len(pieces) <= levels:
        return f"{protocol_of(uri)}://{root_path}" if is_remote(uri) else root_path
    return "/".join(pieces[:-levels])


def resolve_member(uri: str, include_self: bool = False) -> tuple[str, dict | None, tuple | None]:
    """Where the bytes of ``uri`` live, its manifest entry if it is an artifact's file, and the
    enclosing artifact (or None)."""
    found = _enclosing_artifact(uri, include_self)
    if found is None:
        return uri, None, None
    root, rel, manifest = found
    entry = manifest["files"].get(rel)
    if entry is None:
        return uri, None, found
    return member_uri(root, manifest, rel), entry, found


def member_uri(root: str, manifest: dict, rel: str) -> str:
    files_at = manifest.get("files_at")
    return join(root, files_at, rel) if files_at else join(root, rel)


def check_bytes(data: bytes, entry: dict, uri: str) -> None:
    if len(data) != entry["bytes"]:
        raise UserError(f"storage {uri}: has {len(data)} bytes, its artifact's {MANIFEST_NAME} says "
                        f"{entry['bytes']} (damaged, or changed after publishing): refusing to load it")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise UserError(f"storage {uri}: sha256 {digest[:12]}... does not match its artifact's {MANIFEST_NAME} "
                        f"({entry['sha256'][:12]}...): damaged, or changed after publishing; refusing to load it")


def exists(uri: str) -> bool:
    """True if a file or folder is at ``uri`` (a file of a published artifact: its current version)."""
    target, entry, found = resolve_member(uri)
    if entry is not None:
        return _raw_exists(target)
    if found is not None and found[2].get("files_at") and found[1]:
        prefix = found[1].rstrip("/") + "/"
        if any(rel.startswith(prefix) for rel in found[2]["files"]):
            return True  # a folder inside the current version
    return _raw_exists(uri)


def check_reachable(uri: str) -> None:
    """One-line ``UserError`` unless the storage of ``uri`` can be written to later: the endpoint
    answers, the credentials are accepted and, on S3, the bucket exists (``exists`` alone says
    False for a missing bucket). Commands call it on their outputs before any compute."""
    if exists(uri):  # an unreachable endpoint or refused credentials raise here
        return
    protocol = backends.protocol_of(os.fspath(uri))
    if protocol in ("s3", "s3a"):
        bucket = os.fspath(uri).split("://", 1)[1].split("/", 1)[0]
        try:
            s3_filesystem().call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:  # 404: no such bucket (a 403 cannot tell: the first write will say)
            raise UserError(f"storage {uri}: bucket '{bucket}' does not exist at {backends.service_name(uri)}") from None
        except Exception:  # noqa: BLE001 - not allowed to ask, or another answer: nothing to conclude
            pass


def read_bytes(uri: str) -> bytes:
    """The bytes at ``uri``; for a file of a published artifact, its current version, verified.

    A republish between reading the manifest and reading the file (the old version's file
    collected, or a local folder swapped) is noticed, because the manifest entry changed, and
    the read starts over with the new version; a file that fails its check under an unchanged
    manifest is damaged, and refused.
    """
    for attempt in range(3):
        target, entry, _ = resolve_member(uri)
        try:
            with storage_errors(uri):
                fs, path = filesystem(target)
                data = Path(path).read_bytes() if not is_remote(target) else fs.cat_file(path)
            if entry is not None:
                check_bytes(data, entry, uri)
            return data
        except UserError:
            if entry is None or attempt == 2 or resolve_member(uri)[:2] == (target, entry):
                raise
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically replace ``uri`` with ``data`` (creating parent folders)."""
    with storage_errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            write_local(path, [data])
        else:
            fs.pipe_file(path, bytes(data))


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"storage {uri}: not UTF-8 text (byte {exc.start})") from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"storage {uri}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None


def json_default(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and dates (what parquet and datasets hand back)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars and arrays -> Python, recursively."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    elif hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (NaN and infinities written as null, numpy made plain), indented: the one
    way this project writes a JSON document."""
    return json.dumps(_clean(obj), indent=2, default=json_default, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json_text(obj))


def raw_list(uri: str) -> list[str]:
    with storage_errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            return os.listdir(path) if os.path.isdir(path) else []
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        base = path.rstrip("/")
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base})


def list_dir(uri: str) -> list[str]:
    """Sorted names of the direct children of a folder; ``[]`` if it is missing (or a file).

    Inside a published artifact the children are those of its current version. Temporary
    siblings left by an interrupted write or publish, old versions and leases are not listed.
    """
    names = set(raw_list(uri)) - {VERSIONS_DIR, LEASE_NAME, PUBLISHING_NAME}  # this module's own
    found = _enclosing_artifact(uri, include_self=True)
    if found is not None and found[2].get("files_at"):
        root, rel, manifest = found
        prefix = rel.rstrip("/") + "/" if rel else ""
        names |= {f[len(prefix):].split("/", 1)[0] for f in manifest["files"] if f.startswith(prefix)}
    return sorted(n for n in names if not _TEMP_RE.match(n))


def remove(uri: str) -> None:
    """Delete a file or a folder (recursively); nothing happens if it is missing."""
    with storage_errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        if "/" not in path.strip("/"):
            raise UserError(f"storage {uri}: refusing to remove a whole bucket")
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)


def absolute_paths(obj: Any, fields: Any, outputs: Any = ()) -> Any:
    """A copy of the dataclass ``obj`` with the local paths in ``fields`` (dotted names) made absolute.

    Relative paths mean the caller's working directory; Ray workers, Tune trials and Ray
    Train workers run in others. An input is rewritten only when it exists locally (so a
    Hugging Face id such as ``org/model`` or a missing path, reported later in the user's own
    spelling, is left alone); ``outputs`` are always rewritten. URIs are never changed.
    """
    import dataclasses

    def resolve(value: Any, output: bool) -> Any:
        if not isinstance(value, str) or not value or is_remote(value) or value.startswith("file://"):
            return value
        if output or os.path.exists(os.path.expanduser(value)):
            return absolute(value)
        return value

    def replace(target: Any, dotted: str, output: bool) -> Any:
        name, _, rest = dotted.partition(".")
        value = getattr(target, name)
        new = replace(value, rest, output) if rest else resolve(value, output)
        return target if new is value else dataclasses.replace(target, **{name: new})

    for dotted in fields:
        obj = replace(obj, dotted, False)
    for dotted in outputs:
        obj = replace(obj, dotted, True)
    return obj


# ---------------------------------------------------------------------------------------------
# Artifacts: what readers need (publishing and fetching live in probe_dpo.storage.artifacts)


def check_rel(rel: str, uri: str) -> None:
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise UserError(f"storage {uri}: {MANIFEST_NAME} lists a path outside the artifact: {rel!r}")


def parse_manifest(body: bytes, uri: str) -> dict:
    """A manifest checked for the fields readers rely on (UserError naming ``uri`` otherwise)."""
    try:
        manifest = json.loads(body)
    except ValueError:
        raise UserError(f"storage {uri}: {MANIFEST_NAME} is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"storage {uri}: {MANIFEST_NAME} has no 'files' mapping")
    for rel, entry in manifest["files"].items():
        check_rel(rel, uri)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise UserError(f"storage {uri}: {MANIFEST_NAME} entry {rel!r} has no 'bytes' and 'sha256'")
    files_at = manifest.get("files_at")
    if files_at is not None and not (isinstance(files_at, str) and re.fullmatch(rf"{VERSIONS_DIR}/[\w.-]+", files_at)):
        raise UserError(f"storage {uri}: {MANIFEST_NAME} has an invalid 'files_at': {files_at!r}")
    return manifest


def is_complete(uri: str) -> bool:
    """True if ``uri`` holds a published artifact (its manifest, the pointer, is there)."""
    return _raw_exists(join(uri, MANIFEST_NAME))


def read_manifest(uri: str) -> dict:
    """The manifest of a complete artifact; ``UserError`` if there is none.

    ``{"files": {relpath: {"bytes", "sha256"}}, "metadata", "created"}``, plus on S3
    ``"version"`` and ``"files_at"`` (the folder of the current version, relative to ``uri``).
    """
    try:
        body = raw_read(join(uri, MANIFEST_NAME))
    except UserError:
        if is_complete(uri):
            raise
        raise UserError(f"storage {uri}: not a complete artifact (no {MANIFEST_NAME}: never "
                        "published, or publishing stopped half-way)") from None
    return parse_manifest(body, uri)
