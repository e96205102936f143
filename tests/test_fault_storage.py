"""Fault tolerance (c): the S3 endpoint becomes unreachable while a checkpoint is published.

Real network faults, not patched functions: s3fs talks to the session's moto server through a
small TCP proxy on 127.0.0.1 that the test can cut. Two kinds of "unreachable":
- ``cut()``: every open connection is reset and new ones are accepted and reset at once
  (a crashed endpoint or a dropped route); the proxy counts those connection attempts, so the
  test checks the retries really are bounded, not just what the message says.
- ``blackhole()``: the port stops answering connection requests (SYNs go unanswered), so
  only the connect timeout ends each attempt (a firewalled or partitioned endpoint).

What must hold: the publish fails with one ``UserError`` line naming the endpoint and the
number of attempts, within a bounded time; the version being replaced stays the complete,
current one; every previously published checkpoint still loads byte for byte once the
endpoint is back.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from probe_dpo import storage
from probe_dpo.errors import UserError
from probe_dpo.storage import artifacts

ATTEMPTS, CONNECT_TIMEOUT = 2, 1


class FlakyProxy:
    """TCP proxy 127.0.0.1:<port> -> upstream that can be cut, blackholed and restored."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.state = "up"  # up | cut | blackhole
        self.cut_on: bytes | None = None  # cut when the client sends these bytes
        self.refused = 0  # connections accepted and reset while cut (client connection attempts)
        self.requests: list[bytes] = []  # first line of each request forwarded upstream
        self._open: set[socket.socket] = set()
        self._fillers: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listen(0)
        self.url = f"http://127.0.0.1:{self.port}"

    # -- control
    def cut(self) -> None:
        with self._lock:
            if self.state == "up":
                self.state = "cut"
            for conn in list(self._open):
                _reset(conn)
            self._open.clear()

    def blackhole(self) -> None:
        """Listen on the port without ever accepting, backlog full: new SYNs go unanswered."""
        self.cut()
        self.state = "blackhole"
        _stop(self.server)
        self.server = socket.create_server(("127.0.0.1", self.port), backlog=0)
        for _ in range(16):  # the kernel queues backlog+1 connections; the next one must time out
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", self.port))
            except OSError:
                filler.close()
                return
            self._fillers.append(filler)
        raise RuntimeError("could not fill the listen backlog: connections are still accepted")

    def restore(self) -> None:
        self.cut_on = None
        if self.state == "blackhole":
            for filler in self._fillers:
                filler.close()
            self._fillers.clear()
            _stop(self.server)
            self._listen(self.port)
        self.state = "up"

    def close(self) -> None:
        self.state = "closed"
        self.cut()
        for filler in self._fillers:
            filler.close()
        _stop(self.server)

    # -- plumbing
    def _listen(self, port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: same port again
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept_loop, args=(self.server,), daemon=True).start()

    def _accept_loop(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # this listening socket was stopped
            if self.state != "up":
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    if self.cut_on is not None and self.cut_on in data:
                        self.cut()
                        return
                    if data[:8].split(b" ")[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"):
                        self.requests.append(data.split(b"\r\n", 1)[0])
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for s in (src, dst):
                    if s in self._open:
                        self._open.discard(s)
                        _reset(s)


def _stop(server: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its accept()."""
    try:
        server.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    server.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer or a dropped route looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


@pytest.fixture
def proxy(s3_server, monkeypatch):
    host, port = s3_server.removeprefix("http://").split(":")
    p = FlakyProxy((host, int(port)))
    # storage caches its filesystem by endpoint and settings: these give a fresh one
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    monkeypatch.setenv("PROBE_DPO_S3_MAX_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.setenv("PROBE_DPO_S3_CONNECT_TIMEOUT", str(CONNECT_TIMEOUT))
    yield p
    p.close()


def _checkpoint(folder: Path, seed: int) -> Path:
    """A checkpoint-like folder: safetensors weights (~1.2 MB) and a JSON state file."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"layer.weight": torch.randn(512, 512, generator=g), "layer.bias": torch.randn(512, generator=g)},
              str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10 * seed, "seed": seed}))
    return folder


def _assert_loads_as(uri: str, original: Path, dest: Path) -> None:
    """``uri`` is complete and its files load to exactly what ``original`` holds."""
    assert storage.is_complete(uri)
    fetched = artifacts.fetch_dir(uri, dest)
    for name in ("model.safetensors", "trainer_state.json"):
        assert (fetched / name).read_bytes() == (original / name).read_bytes()
    got, want = load_file(str(fetched / "model.safetensors")), load_file(str(original / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((fetched / "trainer_state.json").read_text()) == \
        json.loads((original / "trainer_state.json").read_text())


def _publish_fails(src: Path, uri: str, proxy: FlakyProxy, bound_s: float) -> str:
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        artifacts.publish_dir(src, uri, {"step": 2}, overwrite=True)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None
    assert f"cannot reach S3 endpoint {proxy.url} after {ATTEMPTS} attempts" in message, message
    assert uri in message and "testing" not in message  # names the URI, never the credentials
    assert elapsed < bound_s, f"gave up after {elapsed:.1f}s, bound {bound_s}s"
    return message


def test_endpoint_down_before_overwrite_keeps_previous_checkpoint(proxy, s3_bucket, tmp_path):
    """Blackholed endpoint: each attempt ends at the connect timeout; the old checkpoint survives."""
    uri = storage.join(s3_bucket, "run/checkpoint")
    first, second = _checkpoint(tmp_path / "v1", 1), _checkpoint(tmp_path / "v2", 2)
    artifacts.publish_dir(first, uri, {"step": 1})
    proxy.blackhole()
    # ATTEMPTS connect timeouts plus botocore's backoff between them (< 1 s each)
    _publish_fails(second, uri, proxy, bound_s=ATTEMPTS * (CONNECT_TIMEOUT + 1) + 5)
    proxy.restore()
    _assert_loads_as(uri, first, tmp_path / "fetched")
    assert storage.read_manifest(uri)["metadata"] == {"step": 1}


def test_endpoint_cut_mid_upload_is_bounded_and_keeps_the_current_version(proxy, s3_bucket, tmp_path):
    """The connection drops while the new weights are uploading beside the current version."""
    run = storage.join(s3_bucket, "run")
    earlier, uri = storage.join(run, "checkpoint_000001"), storage.join(run, "checkpoint_000002")
    first, second, third = (_checkpoint(tmp_path / f"v{i}", i) for i in (1, 2, 3))
    artifacts.publish_dir(first, earlier, {"step": 1})
    artifacts.publish_dir(second, uri, {"step": 2})
    key = uri.removeprefix("s3://").split("/", 1)[1]
    proxy.cut_on = f"PUT /{s3_bucket.removeprefix('s3://')}/{key}/_v/".encode()  # the first new file
    _publish_fails(third, uri, proxy, bound_s=ATTEMPTS * (CONNECT_TIMEOUT + 1) + 5)
    assert proxy.state == "cut", "the cut never happened: the upload did not go through the proxy"
    # Bounded for real: two requests meet the cut endpoint (the upload, then the release of the
    # writer lease); botocore makes ATTEMPTS attempts of each, and inside one aiohttp may re-send
    # an idempotent request once on a fresh connection when a reused keep-alive one drops.
    assert 1 <= proxy.refused <= 2 * 2 * ATTEMPTS, proxy.refused
    proxy.restore()
    # the checkpoint being replaced is still the complete previous version: the new files went
    # beside it, and the pointer (its manifest) never moved
    _assert_loads_as(uri, second, tmp_path / "kept")
    assert storage.read_manifest(uri)["metadata"] == {"step": 2}
    # the previously published checkpoint of the run is untouched and loads byte for byte
    _assert_loads_as(earlier, first, tmp_path / "earlier")
    # a restart republishes over the leftovers at once (this process's own unreleased lease is
    # not in its way) and the result is exactly the new version, the leftovers collected
    artifacts.publish_dir(third, uri, {"step": 3}, overwrite=True)
    _assert_loads_as(uri, third, tmp_path / "republished")
    fs, path = storage.filesystem(uri)
    files_at = storage.read_manifest(uri)["files_at"]
    assert sorted(fs.find(path)) == sorted(f"{path}/{k}" for k in (
        "_MANIFEST.json", f"{files_at}/model.safetensors", f"{files_at}/trainer_state.json"))


def test_proxy_forwards_when_up(proxy, s3_bucket, tmp_path):
    """The harness itself: with the proxy up, traffic really goes through it."""
    uri = storage.join(s3_bucket, "plain")
    artifacts.publish_dir(_checkpoint(tmp_path / "v1", 1), uri)
    assert any(b"_MANIFEST.json" in line for line in proxy.requests)
    assert proxy.refused == 0
