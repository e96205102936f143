"""Publishing under faults, on a local folder and on a real S3 endpoint (moto's server).

- A publisher process is SIGKILLed between every pair of its steps (lease, each file, the
  pointer write, garbage collection): a reader always gets the complete old version or the
  complete new one, and a restarted publisher goes through at once and leaves no leftovers.
- Two publishers to one artifact: the second fails with one line naming the first (or, with
  time to wait, goes after it); a crashed or stale lease is taken over; a publisher that lost
  its lease never moves the pointer.
- A damaged byte in a published safetensors file is refused with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probe_dpo import storage
from probe_dpo.errors import UserError
from probe_dpo.storage import artifacts, lease

V1 = {"model.safetensors": b"\x00\x01" * 1000, "config.json": b'{"v": 1}', "sub/dir/a.txt": b"first"}
V2 = {"model.safetensors": b"\x07" * 3333, "config.json": b'{"v": 2}', "new.txt": b"second"}

# A publisher in its own process. argv: src uri metadata-json kill-at-step wait-at-step.
# It prints each step's name; at step number kill-at it SIGKILLs itself; at step number
# wait-at it prints HOLDING and waits for a line on stdin before going on.
PUBLISHER = r"""
import json, os, signal, sys
from probe_dpo import storage
from probe_dpo.storage import artifacts
src, uri, meta, kill_at, wait_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
count = 0
def step(name):
    global count
    count += 1
    print(name, flush=True)
    if count == wait_at:
        print("HOLDING", flush=True)
        sys.stdin.readline()
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
artifacts._step = step
artifacts.publish_dir(src, uri, meta, overwrite=True)
print("PUBLISHED", flush=True)
"""


def _tree_of(files: dict[str, bytes], root: Path) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _publisher(src: Path, uri: str, meta: dict, kill_at: int = 0, wait_at: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, str(src), uri, json.dumps(meta), str(kill_at),
                             str(wait_at)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _reads_as(uri: str, tmp: Path) -> dict[str, bytes]:
    """What a reader gets: the fetched folder, and each file read on its own, which must agree."""
    fetched = artifacts.fetch_dir(uri, tmp)
    tree = {p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*")
            if p.is_file() and p.name != "_MANIFEST.json"}
    for rel, data in tree.items():
        assert storage.read_bytes(storage.join(uri, rel)) == data
    assert set(tree) == set(storage.read_manifest(uri)["files"])
    return tree


def _leftovers(uri: str) -> list[str]:
    """Anything under or beside the artifact that is neither its manifest nor its current files."""
    fs, path = storage.filesystem(uri)
    manifest = storage.read_manifest(uri)
    if storage.is_remote(uri):
        files_at = manifest["files_at"]
        want = {f"{path}/_MANIFEST.json"} | {f"{path}/{files_at}/{rel}" for rel in manifest["files"]}
        return sorted(set(fs.find(path)) - want)
    parent, name = os.path.split(path)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def test_publisher_killed_between_every_pair_of_steps(storage_root, tmp_path):
    src1, src2 = _tree_of(V1, tmp_path / "v1"), _tree_of(V2, tmp_path / "v2")
    steps: list[str] = []
    real_step = artifacts._step
    try:  # the steps of one whole publish, named in order
        artifacts._step = steps.append
        artifacts.publish_dir(src2, storage.join(storage_root, "count"), {"v": 2})
    finally:
        artifacts._step = real_step
    remote = storage.is_remote(storage_root)
    files = sorted(V2)
    assert steps == ["lease", *[f"upload {f}" if remote else f"stage {f}" for f in files],
                     *([] if remote else ["manifest"]), "pointer", "gc"]
    pointer = steps.index("pointer") + 1
    for kill_at in range(1, len(steps) + 1):
        uri = storage.join(storage_root, f"killed-{kill_at}")
        artifacts.publish_dir(src1, uri, {"v": 1})
        proc = _publisher(src2, uri, {"v": 2}, kill_at=kill_at)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -9, err[-2000:]  # really killed, at that step
        assert out.splitlines() == steps[:kill_at]
        want = (V2, {"v": 2}) if kill_at >= pointer else (V1, {"v": 1})
        assert _reads_as(uri, tmp_path / f"read-{kill_at}") == want[0], steps[kill_at - 1]
        assert storage.read_manifest(uri)["metadata"] == want[1]
        # a restart goes through at once (the dead publisher's lease is no obstacle) and cleans up
        start = time.monotonic()
        artifacts.publish_dir(src2, uri, {"v": 3}, overwrite=True)
        assert time.monotonic() - start < 10
        assert _reads_as(uri, tmp_path / f"restart-{kill_at}") == V2
        assert storage.read_manifest(uri)["metadata"] == {"v": 3}
        assert _leftovers(uri) == []


def test_second_publisher_fails_with_one_line_then_goes_after_the_first(storage_root, tmp_path, monkeypatch):
    uri = storage.join(storage_root, "contended")
    src1, src2 = _tree_of(V1, tmp_path / "v1"), _tree_of(V2, tmp_path / "v2")
    artifacts.publish_dir(src1, uri, {"v": 1})
    holder = _publisher(src2, uri, {"v": 2}, wait_at=2)  # holds the lease, one file written
    try:
        while (line := holder.stdout.readline().strip()) != "HOLDING":
            assert line, holder.stderr.read()[-2000:]
        monkeypatch.setenv("PROBE_DPO_LEASE_WAIT", "1")
        with pytest.raises(UserError) as info:
            artifacts.publish_dir(src1, uri, {"v": "second"}, overwrite=True)
        message = str(info.value)
        assert "\n" not in message and info.value.__cause__ is None
        assert message.startswith(f"storage {uri}: another publisher holds its writer lease (pid {holder.pid} on ")
        assert "clobber" in message
        assert storage.read_manifest(uri)["metadata"] == {"v": 1}  # nothing clobbered
        # with time to wait, a second publisher goes once the first has finished
        monkeypatch.setenv("PROBE_DPO_LEASE_WAIT", "60")
        threading.Timer(1.0, lambda: (holder.stdin.write("go\n"), holder.stdin.flush())).start()
        artifacts.publish_dir(src1, uri, {"v": 3}, overwrite=True)
        assert holder.wait(timeout=60) == 0 and "PUBLISHED" in holder.stdout.read()
    finally:
        holder.kill()
    assert storage.read_manifest(uri)["metadata"] == {"v": 3}
    assert _reads_as(uri, tmp_path / "after") == V1
    assert _leftovers(uri) == []


def _put_lease(uri: str, **info) -> None:
    fs, path = storage.filesystem(uri)
    fs.pipe_file(f"{path}/{lease.LEASE_NAME}", json.dumps(info).encode())


def test_s3_lease_of_another_machine_blocks_until_stale_and_a_lost_lease_never_moves_the_pointer(
        s3_bucket, tmp_path, monkeypatch):
    uri = storage.join(s3_bucket, "leased")
    src1, src2 = _tree_of(V1, tmp_path / "v1"), _tree_of(V2, tmp_path / "v2")
    artifacts.publish_dir(src1, uri, {"v": 1})
    # a live lease of a publisher on another machine: refused, naming it
    _put_lease(uri, owner="x", host="other-host", boot="b", pid=4242, since="2026-01-01T00:00:00+00:00", ttl=30)
    monkeypatch.setenv("PROBE_DPO_LEASE_WAIT", "1")
    with pytest.raises(UserError, match=r"holds its writer lease \(pid 4242 on other-host .*stale in \d+s"):
        artifacts.publish_dir(src2, uri, {"v": 2}, overwrite=True)
    # the same lease not renewed for its ttl (by the S3 server's clock) is taken over
    _put_lease(uri, owner="x", host="other-host", boot="b", pid=4242, since="2026-01-01T00:00:00+00:00", ttl=1)
    monkeypatch.setenv("PROBE_DPO_LEASE_WAIT", "30")
    start = time.monotonic()
    artifacts.publish_dir(src2, uri, {"v": 2}, overwrite=True)
    assert 0.5 < time.monotonic() - start < 15
    assert storage.read_manifest(uri)["metadata"] == {"v": 2}
    # a publisher whose lease is taken over while it uploads fails before its pointer write
    real_step = artifacts._step

    def stolen(name: str) -> None:
        if name.startswith("upload"):
            _put_lease(uri, owner="y", host="other-host", boot="b", pid=1, since="now", ttl=30)

    monkeypatch.setattr(artifacts, "_step", stolen)
    with pytest.raises(UserError, match="lost the writer lease before publishing .* the previous version is still"):
        artifacts.publish_dir(src1, uri, {"v": 3}, overwrite=True)
    monkeypatch.setattr(artifacts, "_step", real_step)
    assert storage.read_manifest(uri)["metadata"] == {"v": 2}
    assert _reads_as(uri, tmp_path / "kept") == V2
    fs, path = storage.filesystem(uri)
    assert json.loads(fs.cat_file(f"{path}/{lease.LEASE_NAME}"))["owner"] == "y"  # the new holder's, untouched


def test_legacy_s3_layout_is_read_and_migrated(s3_bucket, tmp_path):
    """Artifacts published by the previous layout (files at the prefix itself) still read, verified,
    and republishing moves them to the versioned layout, removing the old files after the pointer."""
    uri = storage.join(s3_bucket, "legacy")
    fs, path = storage.filesystem(uri)
    manifest = {"files": {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for rel, data in V1.items()}, "metadata": {"v": 1}, "created": "2026-01-01"}
    for rel, data in V1.items():
        fs.pipe_file(f"{path}/{rel}", data)
    fs.pipe_file(f"{path}/_MANIFEST.json", json.dumps(manifest).encode())
    assert _reads_as(uri, tmp_path / "legacy") == V1
    fs.pipe_file(f"{path}/config.json", b'{"v": 9}')  # changed after publishing: refused
    with pytest.raises(UserError, match=r"config.json: has 8 bytes|config.json: sha256"):
        storage.read_json(storage.join(uri, "config.json"))
    artifacts.publish_dir(_tree_of(V2, tmp_path / "v2"), uri, {"v": 2}, overwrite=True)
    assert _reads_as(uri, tmp_path / "migrated") == V2 and _leftovers(uri) == []


def _weights(folder: Path) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(64, 64, generator=g)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"hidden": 64}')
    return folder


def _flip_one_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def test_a_damaged_byte_in_a_published_safetensors_file_is_refused_naming_it(storage_root, tmp_path):
    uri = storage.join(storage_root, "weights")
    artifacts.publish_dir(_weights(tmp_path / "w"), uri)
    member = storage.join(uri, "model.safetensors")
    good = storage.read_bytes(member)
    # damage one byte where the bytes really are: the folder itself, or the current S3 version
    manifest = storage.read_manifest(uri)
    fs, path = storage.filesystem(uri)
    where = f"{path}/{manifest.get('files_at', '')}/model.safetensors".replace("//", "/")
    if storage.is_remote(uri):
        fs.pipe_file(where, _flip_one_byte(good))
    else:
        Path(where).write_bytes(_flip_one_byte(good))
    for read in (lambda: storage.read_bytes(member), lambda: artifacts.read_member(uri, "model.safetensors")):
        with pytest.raises(UserError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"storage {member}: sha256 ") and "refusing to load it" in message
        assert "\n" not in message and info.value.__cause__ is None
    with pytest.raises(UserError, match=r"model.safetensors.*(does not match|sha256)") as info:
        if storage.is_remote(uri):
            artifacts.fetch_dir(uri, tmp_path / "fetched")  # every download is hashed
        else:
            artifacts.verify_files(artifacts.fetch_dir(uri))  # what loaders call before from_pretrained
    assert "\n" not in str(info.value)
    assert storage.read_json(storage.join(uri, "config.json")) == {"hidden": 64}  # the other file is fine


def test_readers_during_republishing_always_get_one_whole_version(storage_root, tmp_path):
    """A publisher republishes two versions in turn while a reader reads: every file read is
    exactly one version's (a read that straddles a republish starts over), and every S3 fetch
    is one whole version."""
    a = {"model.safetensors": b"a" * 20000, "config.json": b'{"v": "a"}'}
    b = {"model.safetensors": b"b" * 30000, "config.json": b'{"v": "b"}'}
    src = {"a": _tree_of(a, tmp_path / "a"), "b": _tree_of(b, tmp_path / "b")}
    uri = storage.join(storage_root, "busy")
    artifacts.publish_dir(src["a"], uri)
    done = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        try:
            for i in range(8):
                artifacts.publish_dir(src["ba"[i % 2]], uri, {"i": i}, overwrite=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    reads = fetches = 0
    while not done.is_set() or reads < 20:
        for rel in ("config.json", "model.safetensors"):
            assert storage.read_bytes(storage.join(uri, rel)) in (a[rel], b[rel])
            reads += 1
        if storage.is_remote(uri):
            fetched = artifacts.fetch_dir(uri, tmp_path / f"fetch-{fetches}")
            tree = {p.name: p.read_bytes() for p in fetched.iterdir() if p.name != "_MANIFEST.json"}
            assert tree in (a, b)
            fetches += 1
    thread.join()
    assert not errors, errors
    assert storage.read_manifest(uri)["metadata"] == {"i": 7} and _reads_as(uri, tmp_path / "last") == a
