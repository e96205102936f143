"""Publishing and fetching artifacts: the write side of ``probe_dpo.storage``.

Call ``publish_dir`` / ``fetch_dir`` / ``read_member`` / ``verify_files`` (``probe_dpo.storage``'s
docstring states the guarantees; this module imports it, never the reverse). The steps of a
publish, each followed by ``_step(name)`` (where the crash tests SIGKILL a publisher):

- S3:    lease -> upload each file to ``_v/<version>/`` -> pointer (the manifest, one PUT)
         -> gc (every other version and leftover under the prefix) -> lease released
- local: lease -> stage each file in a hidden sibling -> manifest (in the stage) -> pointer
         (the stage swapped with the old folder) -> gc (the old folder) -> lease released
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from probe_dpo.errors import UserError
from probe_dpo.storage import (
    LEASE_NAME,
    MANIFEST_NAME,
    PUBLISHING_NAME,
    VERSIONS_DIR,
    ArtifactExists,
    check_bytes,
    check_rel,
    filesystem,
    is_complete,
    is_remote,
    join,
    list_dir,
    local_path,
    member_uri,
    parse_manifest,
    raw_list,
    raw_read,
    read_manifest,
    storage_errors,
    temp_sibling,
    write_local,
)

_CHUNK = 8 * 2**20


def _step(name: str) -> None:
    """Called between the steps of a publish; does nothing: the crash tests' seam (SIGKILL there)."""


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
            write_local(dest, iter(lambda: f.read(_CHUNK), b""))
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


def _new_version() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _manifest(entries: dict, metadata: dict | None, version: str | None = None) -> dict:
    manifest = {"files": entries, "metadata": dict(metadata or {}),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if version is not None:
        manifest.update(version=version, files_at=f"{VERSIONS_DIR}/{version}")
    return manifest


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def publish_dir(local_dir: str | Path, uri: str, metadata: dict | None = None, *,
                overwrite: bool = False) -> dict:
    """Publish every file under ``local_dir`` as an artifact at ``uri``; returns the manifest.

    The new version is written beside the current one and made current by one atomic pointer
    write (module docstring); the old version is deleted only after that. So a reader always
    gets a complete version, old or new, and a publisher killed at any point leaves the old one
    readable; a restart publishes over its leftovers. The writer lease (``probe_dpo.storage.lease``)
    makes a second concurrent publisher to ``uri`` fail with one line instead of clobbering.

    Replacing a complete artifact needs ``overwrite=True`` on every backend (otherwise
    ``ArtifactExists``), so code tested on a local folder behaves the same on S3. So does
    replacing a non-empty folder that is not an artifact (someone else's files), except the
    leftovers of an interrupted publish, which a restart replaces. Publishing a local folder
    onto itself is allowed.
    """
    from probe_dpo.storage import lease

    src = Path(local_dir)
    if not src.is_dir():
        raise UserError(f"storage: cannot publish {src}: not a folder")
    files = _walk(src)
    with storage_errors(uri):
        fs, path = filesystem(uri)
        remote = is_remote(uri)
        in_place = not remote and Path(path).resolve() == src.resolve()
        if not remote and not in_place and Path(path).resolve().is_relative_to(src.resolve()):
            raise UserError(f"storage {uri}: cannot publish {src} into a folder inside itself")
        if remote and "/" not in path.strip("/"):
            raise UserError(f"storage {uri}: publish into a prefix, not a bucket root")
        with lease.hold(uri) as held:
            _step("lease")
            if not overwrite:
                _refuse_replacing(uri, path, remote, in_place)
            if remote:
                return _publish_remote(src, files, fs, path, metadata, held)
            return _publish_local(src, files, path, metadata)


def _refuse_replacing(uri: str, path: str, remote: bool, in_place: bool) -> None:
    if is_complete(uri):
        raise ArtifactExists(f"storage {uri}: a complete artifact is already there "
                             "(pass overwrite=True to replace it)")
    if remote:
        children = [n for n in raw_list(uri) if n not in (VERSIONS_DIR, LEASE_NAME, PUBLISHING_NAME)]
    else:
        children = list_dir(uri) or (["(a file)"] if os.path.isfile(path) else [])
    if children and not in_place and not (remote and PUBLISHING_NAME in raw_list(uri)):
        raise ArtifactExists(f"storage {uri}: not empty and not an artifact (has: "
                             f"{', '.join(children[:5])}); pass overwrite=True to replace it")


def _publish_remote(src: Path, files: list[str], fs: Any, path: str, metadata: dict | None, held: Any) -> dict:
    """S3: files under _v/<version>/, then the manifest (the pointer, one PUT), then GC."""
    version = _new_version()
    manifest = _manifest({}, metadata, version)
    for rel in files:
        size, digest = _sha256_file(src / rel)
        _put_file(src / rel, fs, f"{path}/{manifest['files_at']}/{rel}")
        manifest["files"][rel] = {"bytes": size, "sha256": digest}
        _step(f"upload {rel}")
    held.verify()  # a publisher that lost its lease must not move the pointer
    fs.pipe_file(f"{path}/{MANIFEST_NAME}", _manifest_bytes(manifest))
    _step("pointer")
    keep = {f"{path}/{MANIFEST_NAME}", f"{path}/{LEASE_NAME}"}
    current = f"{path}/{manifest['files_at']}/"
    stale = [k for k in fs.find(path) if k.startswith(f"{path}/") and k not in keep and not k.startswith(current)]
    if stale:
        fs.rm(stale)  # old versions, files of an older layout, leftovers of crashed publishes
    _step("gc")
    return manifest


def _publish_local(src: Path, files: list[str], path: str, metadata: dict | None) -> dict:
    """Local: stage a hidden sibling folder, swap it with the old folder atomically, then GC."""
    _clean_leftovers(path)
    stage = temp_sibling(path)
    swapped = False
    try:
        entries = {}
        for rel in files:
            size, digest = _sha256_file(src / rel)
            _put_file(src / rel, LocalFileSystem(), f"{stage}/{rel}")
            entries[rel] = {"bytes": size, "sha256": digest}
            _step(f"stage {rel}")
        manifest = _manifest(entries, metadata)
        os.makedirs(stage, exist_ok=True)
        write_local(os.path.join(stage, MANIFEST_NAME), [_manifest_bytes(manifest)])
        _step("manifest")
        old = _swap_in(stage, path)
        swapped = True
        _step("pointer")
    finally:
        if not swapped:
            shutil.rmtree(stage, ignore_errors=True)
    if old is not None:
        _delete_local(old)
    _step("gc")
    return manifest


def _delete_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _clean_leftovers(path: str) -> None:
    """Remove what crashed publishes of ``path`` left beside it (the caller holds the lease).

    Without RENAME_EXCHANGE a crash between the two renames of ``_swap_in`` leaves ``path``
    missing and the previous version at ``.<name>.old-*``: that version is put back first.
    """
    head, name = os.path.split(path.rstrip("/"))
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{12}}$")
    leftovers = sorted(os.path.join(head, n) for n in (os.listdir(head) if os.path.isdir(head) else [])
                       if pattern.match(n))
    if not os.path.lexists(path):
        olds = [p for p in leftovers if ".old-" in p and os.path.isfile(os.path.join(p, MANIFEST_NAME))]
        if len(olds) == 1:
            os.rename(olds[0], path)
            leftovers.remove(olds[0])
    for leftover in leftovers:
        _delete_local(leftover)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(stage: str, path: str) -> str | None:
    """Make folder ``stage`` appear at ``path``; returns where the replaced version now is (or None).

    With ``renameat2(RENAME_EXCHANGE)`` the swap is one atomic step: readers see the old
    folder or the new one, never nothing. Without it, two renames, with a moment where
    ``path`` is missing (a crash there is repaired by the next publish, ``_clean_leftovers``).
    """
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    if not os.path.lexists(path):
        os.rename(stage, path)
        _fsync_dir(parent)
        return None
    if _exchange(stage, path):
        _fsync_dir(parent)
        return stage
    old = temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        os.rename(old, path)
        raise
    _fsync_dir(parent)
    return old


def _cache_root() -> Path:
    return Path(os.environ.get("PROBE_DPO_CACHE") or "~/.cache/probe_dpo").expanduser() / "artifacts"


def _files_root(root: Path, manifest: dict) -> Path:
    return root / manifest["files_at"] if manifest.get("files_at") else root


def _verify_sizes(root: Path, manifest: dict, uri: str) -> None:
    for rel, entry in manifest["files"].items():
        check_rel(rel, uri)
        file = root / rel
        if not file.is_file():
            raise UserError(f"storage {uri}: {rel} is listed in {MANIFEST_NAME} but missing")
        if file.stat().st_size != entry["bytes"]:
            raise UserError(f"storage {uri}: {rel} has {file.stat().st_size} bytes, "
                            f"{MANIFEST_NAME} says {entry['bytes']} (damaged, or changed after publishing)")


_VERIFIED: dict[tuple, bool] = {}


def verify_files(folder: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".json")) -> None:
    """Check the sha256 of a local artifact's files ending in ``suffixes`` against its manifest.

    For loaders that read a folder themselves (``from_pretrained``): a damaged weight file is
    refused with one line naming it. A folder without a manifest is not an artifact and passes.
    Each file is hashed once per process while its size and mtime are unchanged.
    """
    root = Path(folder)
    try:
        manifest = parse_manifest((root / MANIFEST_NAME).read_bytes(), str(root))
    except FileNotFoundError:
        return
    _verify_sizes(_files_root(root, manifest), manifest, str(root))
    for rel, entry in manifest["files"].items():
        if not rel.endswith(suffixes):
            continue
        file = _files_root(root, manifest) / rel
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, entry["sha256"])
        if key in _VERIFIED:
            continue
        if _sha256_file(file)[1] != entry["sha256"]:
            raise UserError(f"storage {file}: sha256 does not match its artifact's {MANIFEST_NAME} "
                            "(damaged, or changed after publishing): refusing to load it")
        _VERIFIED[key] = True


def _flat(manifest: dict) -> dict:
    """The manifest of a downloaded copy, whose files sit at the top of its folder."""
    return {k: v for k, v in manifest.items() if k != "files_at"}


def _holds(root: Path, manifest: dict, uri: str) -> bool:
    """True if the local folder ``root`` already holds this artifact, whole."""
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) != _flat(manifest):
            return False
        _verify_sizes(root, manifest, uri)
    except (OSError, ValueError, UserError):
        return False
    return True


def fetch_dir(uri: str, local_dir: str | Path | None = None) -> Path:
    """A local folder holding the complete artifact at ``uri`` (its current version).

    A local ``uri`` is returned as it is, its sizes checked against its manifest (hashes are
    checked when its files are loaded: ``read_bytes``, ``verify_files``). A remote one is
    downloaded into ``local_dir``, or into a cache folder under ``$PROBE_DPO_CACHE`` (default
    ``~/.cache/probe_dpo``) keyed by the URI and its manifest, so a republished artifact is
    fetched again and an unchanged one is not; every downloaded file's size and sha256 are
    checked. The download goes to a temporary sibling and is renamed into place when complete;
    if the artifact is republished meanwhile, the fetch starts over with the new version after a
    pause (0.1 s doubling, ~6 s in all: immediate retries lost the race to a busy publisher).
    """
    if not is_remote(uri):
        manifest = read_manifest(uri)
        root = _files_root(Path(local_path(uri)), manifest)
        _verify_sizes(root, manifest, uri)
        return root
    for attempt in range(attempts := 7):
        time.sleep(0.1 * 2 ** (attempt - 1) if attempt else 0)
        try:
            return _download(uri, read_manifest(uri), local_dir)
        except _Republished:
            continue
    raise UserError(f"storage {uri}: republished {attempts} times while fetching it; try again later")


class _Republished(Exception):
    """The artifact's pointer moved while it was being downloaded."""


def _download(uri: str, manifest: dict, local_dir: str | Path | None) -> Path:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(f"{uri}\n{canonical}".encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    dest = Path(local_dir) if local_dir is not None else _cache_root() / f"{name}-{key}"
    if _holds(dest, manifest, uri):
        return dest
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download per node: the other ranks of a node wait here, then find the folder complete
    with FileLock(str(dest.parent / f".{dest.name}.fetch-lock")):
        return _download_locked(uri, manifest, dest)


def _download_locked(uri: str, manifest: dict, dest: Path) -> Path:
    if _holds(dest, manifest, uri):
        return dest
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST_NAME).exists())):
        raise UserError(f"storage {uri}: cannot fetch into {dest}: it is not empty and holds no artifact")
    with storage_errors(uri):
        fs, _ = filesystem(uri)
        stage = temp_sibling(str(dest))
        try:
            for rel, entry in manifest["files"].items():
                local = os.path.join(stage, rel)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                try:
                    fs.get_file(filesystem(member_uri(uri, manifest, rel))[1], local)
                except FileNotFoundError:
                    if read_manifest(uri) != manifest:
                        raise _Republished() from None
                    raise UserError(f"storage {uri}: {rel} is listed in {MANIFEST_NAME} but missing") from None
                _check_file(Path(local), entry, join(uri, rel))
            if read_manifest(uri) != manifest:
                raise _Republished()
            write_local(os.path.join(stage, MANIFEST_NAME), [_manifest_bytes(_flat(manifest))])
            try:
                old = _swap_in(stage, str(dest))
            except OSError:
                if not _holds(dest, manifest, uri):  # another process fetched it at the same time
                    raise
            else:
                if old is not None:
                    _delete_local(old)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return dest


def _check_file(file: Path, entry: dict, uri: str) -> None:
    size, digest = _sha256_file(file)
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise UserError(f"storage {uri}: the downloaded file does not match its artifact's {MANIFEST_NAME} "
                        f"({size} bytes, sha256 {digest[:12]}...; expected {entry['bytes']} bytes, "
                        f"{entry['sha256'][:12]}...): damaged in storage or in transit")


def read_member(uri: str, rel: str, manifest: dict | None = None) -> bytes:
    """The verified bytes of file ``rel`` of the artifact at ``uri`` (its current version, or the
    version ``manifest`` describes: pass the manifest you already read to skip reading it again)."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    entry = manifest["files"].get(rel)
    if entry is None:
        raise UserError(f"storage {uri}: has no file {rel} (its {MANIFEST_NAME} lists {len(manifest['files'])} files)")
    where = join(uri, rel)
    try:
        data = raw_read(member_uri(uri, manifest, rel))
    except UserError:
        if is_complete(uri) and read_manifest(uri) != manifest:
            raise UserError(f"storage {where}: the artifact was republished while reading it; try again") from None
        raise
    check_bytes(data, entry, where)
    return data


def fetch_folder(uri: str) -> Path:
    """A local copy of a remote folder written without a manifest (a ``save_pretrained`` folder
    someone else uploaded with ``aws s3 cp``, say), cached under ``$PROBE_DPO_CACHE`` and keyed
    by the URI and every file's path, size and ETag (or modification time): a changed folder is
    fetched again, an unchanged one is not. Hidden files are skipped."""
    with storage_errors(uri):
        fs, root = filesystem(uri)
        listing = fs.find(root, detail=True)
        files = {}
        for path, info in sorted(listing.items()):
            rel = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else None
            if not rel or info.get("type") == "directory" or any(p.startswith(".") for p in rel.split("/")):
                continue
            check_rel(rel, uri)
            files[rel] = [info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))]
        if not files:
            raise UserError(f"storage {uri}: an empty folder")
        key = hashlib.sha256(json.dumps([uri, files], sort_keys=True).encode()).hexdigest()[:16]
        dest = _cache_root() / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{key}"
        if (dest / ".fetched.json").exists():
            return dest
        stage = temp_sibling(str(dest))
        try:
            for rel, (size, _) in files.items():
                local = os.path.join(stage, rel)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(f"{root.rstrip('/')}/{rel}", local)
                if size is not None and os.path.getsize(local) != size:
                    raise UserError(f"storage {join(uri, rel)}: downloaded {os.path.getsize(local)} bytes, "
                                    f"the listing says {size}")
            write_local(os.path.join(stage, ".fetched.json"), [json.dumps({"uri": uri, "files": files}).encode()])
            try:
                os.replace(stage, dest)
            except OSError:
                if not (dest / ".fetched.json").exists():  # another process fetched it meanwhile
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return dest
