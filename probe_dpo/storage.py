"""Moving bytes safely: one small API over local folders and ``s3://`` URIs (fsspec / s3fs).

Every function takes a URI: a local path (``runs/x``, ``/abs/x``, ``file:///abs/x``) or a
remote one (``s3://bucket/prefix/x``; other fsspec protocols work through fsspec).

Guarantees
- ``write_bytes`` is atomic: a reader sees the old content or the new, never a partial file
  (local: a temporary sibling file, fsync, ``os.replace``; S3: one PUT, or one multipart
  upload that becomes visible only when it completes).
- An *artifact* is a folder published with ``publish_dir``: its files first, its manifest
  (``_MANIFEST.json``: size and sha256 of every file) last. ``is_complete`` means "the
  manifest is there", so a crash half-way never leaves something that looks complete.
- Errors a user can fix (missing file, missing bucket, no permission, unreachable endpoint,
  no credentials) raise ``UserError`` with one line naming the URI (and the endpoint for S3).
  Unreachable endpoints fail after a bounded number of attempts with a short connect timeout.

S3 settings come from the environment, so Ray workers started after them see the same ones:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``PROBE_DPO_S3_MAX_ATTEMPTS`` (default 3),
``PROBE_DPO_S3_CONNECT_TIMEOUT`` (seconds, default 3). ``configure(...)`` sets them. Credentials
come only from the environment (``AWS_*`` variables or the usual AWS config files): they are
never arguments, never logged, and scrubbed from any error text.

No module state beyond a per-process cache of filesystem objects (keyed by process id and
settings), so functions using this module can be shipped to Ray workers.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
import s3fs
from fsspec.implementations.local import LocalFileSystem

from probe_dpo.errors import UserError

MANIFEST_NAME = "_MANIFEST.json"
PUBLISHING_NAME = "_PUBLISHING"  # S3 only: present while a publish is in progress
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
_CHUNK = 8 * 2**20
_LOCAL_PROTOCOLS = (None, "file", "local")
# Temporary siblings that this module creates (and hides from list_dir): ".<name>.tmp-<hex>".
_TEMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{12}$")
_CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


class ArtifactExists(UserError):
    """``publish_dir`` was asked to replace a complete artifact without ``overwrite=True``."""


# ---------------------------------------------------------------------------------------------
# Settings and filesystems


def configure(endpoint_url: str | None = None, max_attempts: int | None = None,
              connect_timeout: float | None = None) -> None:
    """Set the S3 endpoint / retry settings for this process and the Ray workers it starts later.

    The values go into environment variables (``AWS_ENDPOINT_URL``, ``PROBE_DPO_S3_MAX_ATTEMPTS``,
    ``PROBE_DPO_S3_CONNECT_TIMEOUT``), which Ray workers inherit when ``ray.init`` runs after
    this call. ``None`` leaves a setting as it is.
    """
    if endpoint_url is not None:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    if max_attempts is not None:
        if int(max_attempts) < 1:
            raise UserError(f"storage: max_attempts must be >= 1, got {max_attempts}")
        os.environ["PROBE_DPO_S3_MAX_ATTEMPTS"] = str(int(max_attempts))
    if connect_timeout is not None:
        if float(connect_timeout) <= 0:
            raise UserError(f"storage: connect_timeout must be > 0, got {connect_timeout}")
        os.environ["PROBE_DPO_S3_CONNECT_TIMEOUT"] = str(float(connect_timeout))


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_number(name: str, default: float, cast: type) -> Any:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return cast(default)
    try:
        value = cast(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not a {cast.__name__}") from None
    if value <= 0:
        raise UserError(f"environment variable {name}={raw!r} must be > 0")
    return value


def _max_attempts() -> int:
    return _env_number("PROBE_DPO_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int)


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs with botocore doing all the retrying (bounded by max_attempts): s3fs's own retry
    loop would multiply the attempts. Module-level, so pickled instances (Ray) unpickle anywhere."""

    retries = 1


_FS_CACHE: dict[tuple, Any] = {}


def _s3() -> Any:
    """This process's S3 filesystem for the current settings (re-created when they change)."""
    endpoint, attempts = _endpoint(), _max_attempts()
    timeout = _env_number("PROBE_DPO_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, float)
    creds = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CRED_VARS).encode()).hexdigest()
    key = (os.getpid(), endpoint, attempts, timeout, creds)
    fs = _FS_CACHE.get(key)
    if fs is None:
        fs = _S3FileSystem(
            endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False,
            config_kwargs={"connect_timeout": timeout, "read_timeout": READ_TIMEOUT,
                           "retries": {"total_max_attempts": attempts, "mode": "standard"}})
        _FS_CACHE.clear()  # settings changed (or a new process): drop stale instances
        _FS_CACHE[key] = fs
    return fs


def _protocol(uri: str) -> str | None:
    protocol, _ = fsspec.core.split_protocol(os.fspath(uri))
    return protocol


def is_remote(uri: str) -> bool:
    """True for ``s3://`` and any other non-local fsspec protocol."""
    return _protocol(uri) not in _LOCAL_PROTOCOLS


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (``~`` expanded); URIs and ``None`` unchanged.

    Workflows call it on their configs' paths before Ray sees them: Ray workers and Tune
    trials run in other working directories, where a relative path means something else.
    """
    if uri is None or is_remote(os.fspath(uri)) or os.fspath(uri).startswith("file://"):
        return uri
    return _local_path(uri)


def _local_path(uri: str) -> str:
    _, path = fsspec.core.split_protocol(os.fspath(uri))
    return os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    uri = os.fspath(uri)
    protocol = _protocol(uri)
    if protocol in _LOCAL_PROTOCOLS:
        return LocalFileSystem(), _local_path(uri)
    if protocol in ("s3", "s3a"):
        return _s3(), uri.split("://", 1)[1].strip("/")
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
        return pafs.LocalFileSystem(), _local_path(uri)
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------
# Errors


def _scrub(text: str) -> str:
    for var in _CRED_VARS[:3]:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _where(uri: str) -> str:
    if _protocol(uri) in ("s3", "s3a"):
        return f"S3 endpoint {_endpoint() or '(AWS default)'}"
    return f"the {_protocol(uri)} service"


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Turn the failures a user can fix into one-line ``UserError`` messages naming ``uri``."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised below unless recognised
        message = _describe(uri, exc)
        if message is None:
            raise
        raise UserError(_scrub(f"storage {uri}: {message}")) from None


def _describe(uri: str, exc: Exception) -> str | None:
    remote = is_remote(uri)
    text = str(exc)
    try:
        import botocore.exceptions as bexc
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        bexc = None
    if bexc is not None:
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
            return ("no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "in the environment)")
        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            return f"cannot reach {_where(uri)} after {_max_attempts()} attempts ({type(exc).__name__})"
    if isinstance(exc, FileNotFoundError):
        if remote and ("bucket does not exist" in text or "NoSuchBucket" in text):
            bucket = uri.split("://", 1)[1].split("/", 1)[0]
            return f"bucket '{bucket}' does not exist at {_where(uri)}"
        return "not found"
    if isinstance(exc, PermissionError):
        if remote:
            return f"access denied at {_where(uri)} (check the AWS credentials in the environment)"
        return "permission denied"
    if isinstance(exc, OSError):
        return exc.strerror or text or type(exc).__name__
    return None


# ---------------------------------------------------------------------------------------------
# Files


def _temp_sibling(path: str, kind: str = "tmp") -> str:
    head, name = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{name}.{kind}-{uuid.uuid4().hex[:12]}")


def _write_local(path: str, chunks) -> None:
    """Write chunks to a temporary sibling, fsync, then rename over ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_sibling(path)
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


def exists(uri: str) -> bool:
    """True if a file or folder is at ``uri``."""
    with _errors(uri):
        fs, path = filesystem(uri)
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    with _errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            return Path(path).read_bytes()
        return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically replace ``uri`` with ``data`` (creating parent folders)."""
    with _errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            _write_local(path, [data])
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


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def list_dir(uri: str) -> list[str]:
    """Sorted names of the direct children of a folder; ``[]`` if it is missing (or a file).

    Temporary siblings left by an interrupted write or publish are not listed.
    """
    with _errors(uri):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            names = os.listdir(path) if os.path.isdir(path) else []
        else:
            try:
                entries = fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            base = path.rstrip("/")
            names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return sorted(n for n in names if not _TEMP_RE.match(n))


def remove(uri: str) -> None:
    """Delete a file or a folder (recursively); nothing happens if it is missing."""
    with _errors(uri):
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


# ---------------------------------------------------------------------------------------------
# Artifacts: folders published with a manifest written last


def _sha256_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _put_file(src: Path, fs: fsspec.AbstractFileSystem, dest: str) -> None:
    """Copy one local file into ``fs`` at ``dest`` (the single place publishing writes a file)."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(src, "rb") as f:
            _write_local(dest, iter(lambda: f.read(_CHUNK), b""))
    else:
        fs.put_file(str(src), dest)


def _walk(root: Path) -> list[str]:
    files = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, PUBLISHING_NAME):
                files.append(rel)
    return sorted(files)


def is_complete(uri: str) -> bool:
    """True if ``uri`` holds a published artifact (its manifest, written last, is there)."""
    return exists(join(uri, MANIFEST_NAME))


def read_manifest(uri: str) -> dict:
    """The manifest of a complete artifact; ``UserError`` if there is none."""
    if not is_complete(uri):
        raise UserError(f"storage {uri}: not a complete artifact (no {MANIFEST_NAME}: never "
                        "published, or publishing stopped half-way)")
    manifest = read_json(join(uri, MANIFEST_NAME))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"storage {uri}: {MANIFEST_NAME} has no 'files' mapping")
    return manifest


def publish_dir(local_dir: str | Path, uri: str, metadata: dict | None = None, *,
                overwrite: bool = False) -> dict:
    """Publish every file under ``local_dir`` as an artifact at ``uri``; returns the manifest.

    The manifest (``_MANIFEST.json``: ``{"files": {relpath: {"bytes", "sha256"}},
    "metadata", "created"}``) is always written last, so an interrupted publish is never
    complete, and a restart can publish again over its leftovers.

    Replacing a complete artifact needs ``overwrite=True`` on every backend (otherwise
    ``ArtifactExists``), so code tested on a local folder behaves the same on S3. So does
    replacing a non-empty folder that is not an artifact (someone else's files), except the
    leftovers of an interrupted publish (on S3 they carry a ``_PUBLISHING`` marker), which a
    restart replaces. Publishing a local folder onto itself is allowed.
    - local: the files are copied into a hidden temporary sibling, the manifest written in
      it, and the folder renamed into place (an old artifact is renamed aside first and
      deleted after). Readers see the old complete artifact or the new one; there is no
      moment where a mix of both looks complete.
    - S3 has no atomic rename of a prefix, and writing new files under an old manifest would
      make a mix of old and new look complete. So the old manifest is deleted FIRST (the
      artifact stops being complete), the prefix is cleared, the new files are uploaded and
      the new manifest is written last. While it is being replaced (or if that is
      interrupted) the artifact reads as not complete; it never reads as complete but wrong.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise UserError(f"storage: cannot publish {src}: not a folder")
    files = _walk(src)
    with _errors(uri):
        fs, path = filesystem(uri)
        remote = is_remote(uri)
        in_place = not remote and Path(path).resolve() == src.resolve()
        if not remote and not in_place and Path(path).resolve().is_relative_to(src.resolve()):
            raise UserError(f"storage {uri}: cannot publish {src} into a folder inside itself")
        if remote and "/" not in path.strip("/"):
            raise UserError(f"storage {uri}: publish into a prefix, not a bucket root")
        if not overwrite:
            if is_complete(uri):
                raise ArtifactExists(f"storage {uri}: a complete artifact is already there "
                                     "(pass overwrite=True to replace it)")
            children = list_dir(uri) or (["(a file)"] if not remote and os.path.isfile(path) else [])
            if children and not in_place and PUBLISHING_NAME not in children:
                raise ArtifactExists(f"storage {uri}: not empty and not an artifact (has: "
                                     f"{', '.join(children[:5])}); pass overwrite=True to replace it")
        manifest_path = f"{path}/{MANIFEST_NAME}"
        if remote:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(manifest_path)  # from here on the old artifact is not complete
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)  # no stale files from the old version or a crash
            fs.pipe_file(f"{path}/{PUBLISHING_NAME}", b"")  # marks leftovers of a crash as ours
        stage = path if remote else _temp_sibling(path)
        try:
            entries = {}
            for rel in files:
                size, digest = _sha256_file(src / rel)
                _put_file(src / rel, fs, f"{stage}/{rel}")
                entries[rel] = {"bytes": size, "sha256": digest}
            manifest = {"files": entries, "metadata": dict(metadata or {}),
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            body = (json.dumps(manifest, indent=2) + "\n").encode()
            if remote:
                fs.pipe_file(manifest_path, body)
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(f"{path}/{PUBLISHING_NAME}")
            else:
                os.makedirs(stage, exist_ok=True)
                _write_local(os.path.join(stage, MANIFEST_NAME), [body])
                _swap_in(stage, path)
        except BaseException:
            if not remote:
                shutil.rmtree(stage, ignore_errors=True)
            raise
        return manifest


def _swap_in(stage: str, path: str) -> None:
    """Rename folder ``stage`` to ``path``, moving anything already at ``path`` aside first."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not os.path.lexists(path):
        os.rename(stage, path)
        return
    old = _temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        os.rename(old, path)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


def _cache_root() -> Path:
    return Path(os.environ.get("PROBE_DPO_CACHE") or "~/.cache/probe_dpo").expanduser() / "artifacts"


def _check_rel(rel: str, uri: str) -> None:
    if rel.startswith("/") or ".." in rel.split("/"):
        raise UserError(f"storage {uri}: {MANIFEST_NAME} lists a path outside the artifact: {rel}")


def _verify_sizes(root: Path, manifest: dict, uri: str) -> None:
    for rel, entry in manifest["files"].items():
        _check_rel(rel, uri)
        file = root / rel
        if not file.is_file():
            raise UserError(f"storage {uri}: {rel} is listed in {MANIFEST_NAME} but missing")
        if file.stat().st_size != entry["bytes"]:
            raise UserError(f"storage {uri}: {rel} has {file.stat().st_size} bytes, "
                            f"{MANIFEST_NAME} says {entry['bytes']}")


def _holds(root: Path, manifest: dict, uri: str) -> bool:
    """True if the local folder ``root`` already holds this artifact, whole."""
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) != manifest:
            return False
        _verify_sizes(root, manifest, uri)
    except (OSError, ValueError, UserError):
        return False
    return True


def fetch_dir(uri: str, local_dir: str | Path | None = None) -> Path:
    """A local folder holding the complete artifact at ``uri`` (sizes checked against its manifest).

    A local ``uri`` is returned as it is. A remote one is downloaded into ``local_dir``, or
    into a cache folder under ``$PROBE_DPO_CACHE`` (default ``~/.cache/probe_dpo``) keyed by
    the URI and its manifest, so a republished artifact is fetched again and an unchanged one
    is not. The download goes to a temporary sibling and is renamed into place when complete.
    """
    manifest = read_manifest(uri)
    if not is_remote(uri):
        root = Path(_local_path(uri))
        _verify_sizes(root, manifest, uri)
        return root
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(f"{uri}\n{canonical}".encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    dest = Path(local_dir) if local_dir is not None else _cache_root() / f"{name}-{key}"
    if _holds(dest, manifest, uri):
        return dest
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST_NAME).exists())):
        raise UserError(f"storage {uri}: cannot fetch into {dest}: it is not empty and holds no artifact")
    with _errors(uri):
        fs, path = filesystem(uri)
        stage = _temp_sibling(str(dest))
        try:
            for rel in manifest["files"]:
                _check_rel(rel, uri)
                os.makedirs(os.path.dirname(os.path.join(stage, rel)), exist_ok=True)
                fs.get_file(f"{path}/{rel}", os.path.join(stage, rel))
            _verify_sizes(Path(stage), manifest, uri)
            if read_manifest(uri) != manifest:
                raise UserError(f"storage {uri}: the artifact was republished while fetching it; try again")
            _write_local(os.path.join(stage, MANIFEST_NAME), [json.dumps(manifest, indent=2).encode()])
            try:
                _swap_in(stage, str(dest))
            except OSError:
                if not _holds(dest, manifest, uri):  # another process fetched it at the same time
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return dest
