"""storage: every behaviour on a local folder and on a real S3 endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import pytest
from conftest import free_ports

from probe_dpo import storage
from probe_dpo.errors import UserError
from probe_dpo.storage import artifacts


def _make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _consistent(uri: str) -> None:
    """If the artifact looks complete, every file matches its manifest exactly."""
    if storage.is_complete(uri):
        manifest = storage.read_manifest(uri)
        for rel, entry in manifest["files"].items():
            data = storage.read_bytes(storage.join(uri, rel))
            assert len(data) == entry["bytes"]
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]


V1 = {"model.safetensors": b"\x00\x01" * 1000, "config.json": b'{"v": 1}', "sub/dir/a.txt": b"first"}
V2 = {"model.safetensors": b"\x07" * 3333, "config.json": b'{"v": 2}', "new.txt": b"second"}


def test_join_and_is_remote():
    assert storage.join("s3://b/p", "a", "b/c") == "s3://b/p/a/b/c"
    assert storage.join("s3://b/p/", "/a/") == "s3://b/p/a"
    assert storage.join("/tmp/x", "/etc", "y") == "/tmp/x/etc/y"  # a part never resets the base
    assert storage.join("rel", "a") == os.path.join("rel", "a")
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b/p")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert not storage.is_remote("runs/x")


def test_absolute_fixes_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/demo") == str(tmp_path / "runs" / "demo")
    assert storage.absolute("~/x") == os.path.expanduser("~/x")
    assert storage.absolute("s3://b/runs/demo") == "s3://b/runs/demo"
    assert storage.absolute("file:///tmp/x") == "file:///tmp/x" and storage.absolute(None) is None


def test_filesystem_paths(s3_server, tmp_path):
    fs, path = storage.filesystem("s3://bucket/a/b/")
    assert path == "bucket/a/b" and "s3" in fs.protocol
    fs, path = storage.filesystem(str(tmp_path / "x"))
    assert path == str(tmp_path / "x") and "file" in fs.protocol


def test_round_trips_and_listing(storage_root):
    root = storage_root
    storage.write_bytes(storage.join(root, "raw.bin"), b"\x00\xffabc")
    storage.write_text(storage.join(root, "dir/t.txt"), "héllo\n")
    storage.write_json(storage.join(root, "dir/sub/m.json"), {"b": 1, "a": [1.5, None, "x"]})
    assert storage.read_bytes(storage.join(root, "raw.bin")) == b"\x00\xffabc"
    assert storage.read_text(storage.join(root, "dir/t.txt")) == "héllo\n"
    assert storage.read_json(storage.join(root, "dir/sub/m.json")) == {"b": 1, "a": [1.5, None, "x"]}
    text = storage.read_text(storage.join(root, "dir/sub/m.json"))
    assert text.index('"b"') < text.index('"a"') and '\n  "b": 1' in text  # indent=2, key order kept
    storage.write_bytes(storage.join(root, "raw.bin"), b"new")  # replace
    assert storage.read_bytes(storage.join(root, "raw.bin")) == b"new"

    assert storage.list_dir(root) == ["dir", "raw.bin"]
    assert storage.list_dir(storage.join(root, "dir")) == ["sub", "t.txt"]
    assert storage.list_dir(storage.join(root, "missing")) == []
    storage.write_bytes(storage.join(root, "dir/.t.txt.tmp-0123456789ab"), b"left by a crash")
    assert storage.list_dir(storage.join(root, "dir")) == ["sub", "t.txt"]  # temp siblings hidden
    assert storage.exists(storage.join(root, "dir")) and storage.exists(storage.join(root, "raw.bin"))
    assert not storage.exists(storage.join(root, "nope"))

    # remove: a folder recursively, a file, a missing path; a sibling sharing the prefix stays
    storage.write_bytes(storage.join(root, "dirx"), b"keep")
    storage.remove(storage.join(root, "dir"))
    storage.remove(storage.join(root, "raw.bin"))
    storage.remove(storage.join(root, "never-there"))
    assert storage.list_dir(root) == ["dirx"]
    assert storage.read_bytes(storage.join(root, "dirx")) == b"keep"


def test_missing_file_is_a_user_error(storage_root):
    uri = storage.join(storage_root, "no/such.json")
    with pytest.raises(UserError, match="not found") as info:
        storage.read_json(uri)
    assert uri in str(info.value)


def test_bad_json_names_the_uri(storage_root):
    uri = storage.join(storage_root, "bad.json")
    storage.write_text(uri, '{"a": 1,\n oops}')
    with pytest.raises(UserError, match=r"not valid JSON \(line 2") as info:
        storage.read_json(uri)
    assert uri in str(info.value)


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    storage.write_bytes(str(target), b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UserError, match="No space left"):
        storage.write_bytes(str(target), b"new-content")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # the temporary file was removed


def test_publish_fetch_round_trip(storage_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_DPO_CACHE", str(tmp_path / "cache"))
    src = _make_tree(tmp_path / "src", V1)
    uri = storage.join(storage_root, "artifacts/model")
    assert not storage.is_complete(uri)
    manifest = artifacts.publish_dir(src, uri, metadata={"step": 3})
    assert storage.is_complete(uri)
    assert manifest["metadata"] == {"step": 3} and "created" in manifest
    assert manifest["files"]["sub/dir/a.txt"] == {"bytes": 5, "sha256": hashlib.sha256(b"first").hexdigest()}
    assert set(manifest["files"]) == set(V1)
    assert storage.read_manifest(uri) == manifest
    assert storage.list_dir(uri) == sorted(["_MANIFEST.json", "config.json", "model.safetensors", "sub"])
    assert storage.list_dir(storage.join(storage_root, "artifacts")) == ["model"]  # no temp siblings

    local = artifacts.fetch_dir(uri)
    assert _tree(local) == {**V1, "_MANIFEST.json": _tree(local)["_MANIFEST.json"]}
    # the local copy's files sit at its top: its manifest is the artifact's without "files_at"
    assert json.loads((local / "_MANIFEST.json").read_text()) == {k: v for k, v in manifest.items() if k != "files_at"}
    assert ("files_at" in manifest) == storage.is_remote(uri)
    if storage.is_remote(uri):
        assert str(local).startswith(str(tmp_path / "cache"))
        assert artifacts.fetch_dir(uri) == local  # cached
        chosen = artifacts.fetch_dir(uri, tmp_path / "chosen")
        assert chosen == tmp_path / "chosen" and _tree(chosen) == _tree(local)
    else:
        assert local == Path(uri)


def test_folder_without_manifest_is_not_complete(storage_root, tmp_path):
    uri = storage.join(storage_root, "half")
    storage.write_bytes(storage.join(uri, "weights.bin"), b"123")
    assert storage.exists(uri) and not storage.is_complete(uri)
    with pytest.raises(UserError, match="not a complete artifact") as info:
        storage.read_manifest(uri)
    assert uri in str(info.value)
    with pytest.raises(UserError, match="not a complete artifact"):
        artifacts.fetch_dir(uri, tmp_path / "dest")
    # someone else's files are not replaced without overwrite=True
    with pytest.raises(storage.ArtifactExists, match="not empty and not an artifact"):
        artifacts.publish_dir(_make_tree(tmp_path / "src", V1), uri)
    assert storage.read_bytes(storage.join(uri, "weights.bin")) == b"123"


def test_republish_needs_overwrite_and_keeps_the_old_version_until_the_pointer_moves(storage_root, tmp_path,
                                                                                    monkeypatch):
    uri = storage.join(storage_root, "ckpt")
    sibling = storage.join(storage_root, "ckpt-2")  # shares the prefix: never collected with ckpt
    artifacts.publish_dir(_make_tree(tmp_path / "v1", V1), uri, {"v": 1})
    artifacts.publish_dir(tmp_path / "v1", sibling, {"sibling": True})
    with pytest.raises(storage.ArtifactExists, match="overwrite=True") as info:
        artifacts.publish_dir(_make_tree(tmp_path / "v2", V2), uri, {"v": 2})
    assert uri in str(info.value)
    assert storage.read_manifest(uri)["metadata"] == {"v": 1}

    seen = []
    real_put = artifacts._put_file

    def checking_put(src, fs, dest):
        _consistent(uri)  # at every step: complete and exactly the old version
        seen.append((storage.is_complete(uri), storage.read_manifest(uri)["metadata"]))
        real_put(src, fs, dest)

    monkeypatch.setattr(artifacts, "_put_file", checking_put)
    artifacts.publish_dir(tmp_path / "v2", uri, {"v": 2}, overwrite=True)
    assert seen == [(True, {"v": 1})] * len(V2)  # both backends: the old version stays readable
    assert storage.read_manifest(uri)["metadata"] == {"v": 2}
    _consistent(uri)
    fetched = artifacts.fetch_dir(uri, tmp_path / "fetched")
    assert {k: v for k, v in _tree(fetched).items() if k != "_MANIFEST.json"} == V2  # no stale v1 files
    assert not storage.exists(storage.join(uri, "sub/dir/a.txt"))
    assert storage.list_dir(uri) == sorted(["_MANIFEST.json", *{k.split("/")[0] for k in V2}])
    assert storage.read_manifest(sibling)["metadata"] == {"sibling": True}
    _consistent(sibling)
    assert storage.read_bytes(storage.join(sibling, "sub/dir/a.txt")) == b"first"
    if storage.is_remote(uri):  # old versions are garbage-collected once the new pointer exists
        fs, path = storage.filesystem(uri)
        files_at = storage.read_manifest(uri)["files_at"]
        assert sorted(fs.find(path)) == sorted([f"{path}/_MANIFEST.json"] + [f"{path}/{files_at}/{k}" for k in V2])


def test_crash_mid_publish_leaves_the_old_version(storage_root, tmp_path, monkeypatch):
    uri = storage.join(storage_root, "crash")
    fresh = storage.join(storage_root, "crash-fresh")
    artifacts.publish_dir(_make_tree(tmp_path / "v1", V1), uri)
    before = storage.read_manifest(uri)
    real_put = artifacts._put_file

    def dying_put(src, fs, dest):
        if dest.endswith("new.txt"):  # the last file of V2
            raise RuntimeError("simulated crash")
        real_put(src, fs, dest)

    monkeypatch.setattr(artifacts, "_put_file", dying_put)
    src2 = _make_tree(tmp_path / "v2", V2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        artifacts.publish_dir(src2, fresh)
    assert not storage.is_complete(fresh)
    with pytest.raises(RuntimeError, match="simulated crash"):
        artifacts.publish_dir(src2, uri, overwrite=True)
    assert storage.read_manifest(uri) == before  # the previous version is intact and current
    _consistent(uri)
    assert {k: v for k, v in _tree(artifacts.fetch_dir(uri, tmp_path / "old")).items() if k != "_MANIFEST.json"} == V1
    assert storage.list_dir(storage_root) == (["crash", "crash-fresh"] if storage.is_remote(uri) else ["crash"])
    # a restart publishes over the leftovers without needing overwrite=True
    monkeypatch.setattr(artifacts, "_put_file", real_put)
    artifacts.publish_dir(src2, fresh)
    assert storage.is_complete(fresh) and storage.read_manifest(fresh)["files"].keys() == V2.keys()
    _consistent(fresh)
    assert storage.list_dir(fresh) == sorted(["_MANIFEST.json", *{k.split("/")[0] for k in V2}])


def test_pyarrow_filesystem_round_trip(storage_root):
    fs, path = storage.pyarrow_filesystem(storage_root)
    fs.create_dir(path + "/run", recursive=True)
    with fs.open_output_stream(path + "/run/blob.bin") as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(storage.join(storage_root, "run/blob.bin")) == b"written by pyarrow"
    storage.write_bytes(storage.join(storage_root, "run/back.bin"), b"read by pyarrow")
    with fs.open_input_stream(path + "/run/back.bin") as f:
        assert f.read() == b"read by pyarrow"
    # Ray ships the filesystem to workers: it pickles without credentials and still works
    blob = pickle.dumps(fs)
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "testing").encode() not in blob
    with pickle.loads(blob).open_input_stream(path + "/run/blob.bin") as f:
        assert f.read() == b"written by pyarrow"
    if storage.is_remote(storage_root):
        assert path == storage_root.removeprefix("s3://")
    else:
        assert path == os.path.abspath(storage_root)


def test_unreachable_endpoint_is_one_bounded_user_error(s3_bucket, tmp_path, monkeypatch):
    uri = storage.join(s3_bucket, "published")
    artifacts.publish_dir(_make_tree(tmp_path / "v1", V1), uri)
    bad = f"http://127.0.0.1:{free_ports(1)[0]}"
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", bad)
        start = time.monotonic()
        with pytest.raises(UserError) as info:
            storage.read_bytes(storage.join(uri, "config.json"))
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert message == (f"storage {uri}/config.json: cannot reach S3 endpoint {bad} after 3 attempts "
                           "(EndpointConnectionError)")
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no traceback chain
        assert elapsed < 30
    # the real server's artifact is untouched
    assert storage.is_complete(uri)
    fetched = artifacts.fetch_dir(uri, tmp_path / "after")
    assert {k: v for k, v in _tree(fetched).items() if k != "_MANIFEST.json"} == V1


def test_configure_sets_endpoint_and_attempts(s3_server, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "PROBE_DPO_S3_MAX_ATTEMPTS", "PROBE_DPO_S3_CONNECT_TIMEOUT"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    bad = f"http://127.0.0.1:{free_ports(1)[0]}"
    storage.configure(endpoint_url=bad, max_attempts=2, connect_timeout=1)
    for call in (lambda: storage.write_bytes("s3://some-bucket/x", b"1"),
                 lambda: storage.is_complete("s3://some-bucket/x")):  # never a silent False
        start = time.monotonic()
        with pytest.raises(UserError, match=r"cannot reach S3 endpoint .* after 2 attempts") as info:
            call()
        assert time.monotonic() - start < 30
        assert "s3://some-bucket/x" in str(info.value) and bad in str(info.value)
        assert "\n" not in str(info.value) and "testing" not in str(info.value)  # one line, no credentials
    with pytest.raises(UserError, match="max_attempts"):
        storage.configure(max_attempts=0)


def test_missing_bucket_names_bucket_and_endpoint(s3_server):
    with pytest.raises(UserError) as info:
        storage.write_bytes("s3://no-such-bucket-zz/a/b.txt", b"1")
    message = str(info.value)
    assert "s3://no-such-bucket-zz/a/b.txt" in message and "bucket 'no-such-bucket-zz' does not exist" in message
    assert s3_server in message


def test_ray_worker_uses_storage(ray_cluster, s3_bucket):
    @ray_cluster.remote
    def work(root):
        storage.write_json(storage.join(root, "from-worker.json"), {"pid": os.getpid()})
        return storage.read_bytes(storage.join(root, "from-driver.bin"))

    storage.write_bytes(storage.join(s3_bucket, "from-driver.bin"), b"hello worker")
    assert ray_cluster.get(work.remote(s3_bucket), timeout=60) == b"hello worker"
    assert storage.read_json(storage.join(s3_bucket, "from-worker.json"))["pid"] != os.getpid()


def test_unrecognised_s3_errors_are_one_line(s3_server):
    """botocore errors that s3fs does not translate (here a bucket name botocore refuses) used to
    end in a traceback; they are one line naming the URI, the endpoint and botocore's reason."""
    for call in (lambda: storage.read_bytes("s3://bad_bucket!/x"), lambda: storage.write_bytes("s3://bad_bucket!/x", b"1"),
                 lambda: storage.exists("s3://bad_bucket!/a/b")):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert message.startswith("storage s3://bad_bucket!/") and f"S3 request failed at S3 endpoint {s3_server}" in message
        assert "ParamValidationError: Parameter validation failed: Invalid bucket name" in message
        assert "\n" not in message and info.value.__cause__ is None
