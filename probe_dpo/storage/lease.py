"""A writer lease per artifact: one publisher at a time, and a clear error for the second.

Two publishers writing one artifact would interleave their versions; with a lease the second
one waits a bounded time for the first to finish, then fails with one ``UserError`` line that
names the holder. A publisher that crashed must not block the artifact for ever:

- local folders: an ``flock`` on a hidden sibling file ``.<name>.lease``. The kernel drops the
  lock the moment its holder dies (even by SIGKILL), so a crash frees it at once.
- S3: an object ``<prefix>/_LEASE`` created with a conditional PUT (``If-None-Match: *``), so
  exactly one of two racing publishers gets it. Its holder renews it (``If-Match`` on its own
  ETag) from a heartbeat thread every ``ttl / 3`` seconds; a lease not renewed for ``ttl``
  seconds, judged by the S3 server's clock (its ``Date`` header against the object's
  ``Last-Modified``, so client clocks never matter), or held by a dead process on this very
  machine, is stale and is taken over with ``If-Match`` on the stale ETag (again exactly
  one taker wins). Before its pointer write a publisher checks that the lease is still its
  own, so a publisher that stalled past its lease never overwrites a newer version.

Settings (environment, read at each acquisition): ``PROBE_DPO_LEASE_TTL`` (seconds, default
30) and ``PROBE_DPO_LEASE_WAIT`` (how long a second publisher waits for the lease before it
fails, default 60: long enough for a crashed holder's lease to expire, so a retried task
after a node failure gets through).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from probe_dpo.errors import UserError

LEASE_NAME = "_LEASE"
DEFAULT_TTL = 30.0
DEFAULT_WAIT = 60.0


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise UserError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner() -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine has that pid (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: set[str] = set()  # owner ids of the leases this process holds right now


def _abandoned(info: dict) -> bool:
    """True when the holder ran on this machine (same host and boot) and is gone: its process
    died, or it is this process and no longer holds it (a release that could not reach S3)."""
    if info.get("host") != socket.gethostname() or info.get("boot") != _boot_id():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return info.get("owner") not in _HELD
    return not pid_alive(pid)


def _held_message(uri: str, info: dict, waited: float, detail: str = "") -> str:
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
    return (f"storage {uri}: another publisher holds its writer lease ({who}{detail}); waited {waited:.0f}s. "
            "Two publishers to one artifact would clobber each other: wait for it to finish, or publish elsewhere")


@contextlib.contextmanager
def hold(uri: str) -> Iterator["_Lease"]:
    """Hold the writer lease of the artifact at ``uri`` for the ``with`` block."""
    from probe_dpo import storage

    fs, path = storage.filesystem(uri)
    lease = _S3Lease(uri, fs, path) if storage.is_remote(uri) else _LocalLease(uri, path)
    lease.acquire(_setting("PROBE_DPO_LEASE_WAIT", DEFAULT_WAIT))
    try:
        yield lease
    finally:
        lease.release()


class _Lease:
    def verify(self) -> None:
        """UserError unless this publisher still holds the lease (checked before the pointer write)."""


class _LocalLease(_Lease):
    """``flock`` on ``.<name>.lease`` beside the artifact folder."""

    def __init__(self, uri: str, path: str):
        head, name = os.path.split(path.rstrip("/"))
        self.uri, self.file, self.fd = uri, os.path.join(head, f".{name}.lease"), None

    def acquire(self, wait: float) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
        start = time.monotonic()
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                waited = time.monotonic() - start
                if waited >= wait:
                    raise UserError(_held_message(self.uri, self._holder(), waited)) from None
                time.sleep(min(0.5, wait - waited))
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder unlinked while we were opening it
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_owner()).encode())
                return
            os.close(fd)

    def _holder(self) -> dict:
        try:
            with open(self.file) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.file)  # while still locked: a waiter re-checks the inode and retries
        os.close(self.fd)
        self.fd = None


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code ("PreconditionFailed", ...) behind an s3fs/botocore exception."""
    cur: BaseException | None = exc
    for _ in range(5):
        if cur is None:
            return None
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code") or "") or None
        cur = cur.__cause__ or cur.__context__
    return None


_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class _S3Lease(_Lease):
    """``<prefix>/_LEASE`` created and renewed with conditional PUTs, renewed by a heartbeat."""

    def __init__(self, uri: str, fs: Any, path: str):
        self.uri, self.fs = uri, fs
        self.bucket, self.key = f"{path}/{LEASE_NAME}".split("/", 1)
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, body: bytes, **condition: str) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        return out["ETag"]

    def _current(self) -> tuple[str, dict, bool] | None:
        """(etag, holder info, stale) of the lease object, or None when there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
            body = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        try:
            info = json.loads(body)
        except ValueError:
            info = {}
        ttl = float(info.get("ttl") or DEFAULT_TTL)
        server_now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - head["LastModified"]).total_seconds()
        info["age"] = age
        return head["ETag"], info, age > ttl or _abandoned(info)

    def acquire(self, wait: float) -> None:
        self.ttl = _setting("PROBE_DPO_LEASE_TTL", DEFAULT_TTL) or DEFAULT_TTL
        self.info = {**_owner(), "ttl": self.ttl}
        body = json.dumps(self.info).encode()
        start = time.monotonic()
        while True:
            try:
                self.etag = self._put(body, IfNoneMatch="*")
                break
            except (FileExistsError, OSError) as exc:
                if not isinstance(exc, FileExistsError) and _s3_code(exc) not in _CONFLICT:
                    raise
            current = self._current()
            if current is None:
                continue  # released in between: try again at once
            etag, info, stale = current
            if stale:
                try:
                    self.etag = self._put(body, IfMatch=etag)  # take over; only one taker wins
                    break
                except (FileNotFoundError, OSError) as exc:
                    if not isinstance(exc, FileNotFoundError) and _s3_code(exc) not in _CONFLICT:
                        raise
                    continue
            waited = time.monotonic() - start
            if waited >= wait:
                left = max(0.0, info.get("ttl", self.ttl) - info["age"])
                raise UserError(_held_message(self.uri, info, waited, f", renewed {info['age']:.0f}s ago, "
                                                                     f"stale in {left:.0f}s unless renewed"))
            time.sleep(min(1.0, wait - waited))
        _HELD.add(self.info["owner"])
        self._thread = threading.Thread(target=self._heartbeat, name="probe-dpo-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        body = json.dumps(self.info).encode()
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(body, IfMatch=self.etag)
            except Exception as exc:  # noqa: BLE001 - reported by verify()
                if isinstance(exc, FileNotFoundError) or _s3_code(exc) in _CONFLICT:
                    self.lost = "it was taken over by another publisher after it went stale"
                    return
                # a transient error: the next beat tries again; verify() checks the real state

    def verify(self) -> None:
        current = self._current() if self.lost is None else None
        if self.lost is None and (current is None or current[0] != self.etag):
            self.lost = "it is no longer the lease this publisher wrote"
        if self.lost is not None:
            raise UserError(f"storage {self.uri}: lost the writer lease before publishing ({self.lost}); "
                            "nothing was made current, the previous version is still the one readers get")

    def release(self) -> None:
        """Delete the lease if it is still ours. Best effort: a lease that cannot be deleted (the
        endpoint is down) goes stale after ``ttl`` seconds, at once for this process's next publish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        _HELD.discard(getattr(self, "info", {}).get("owner"))
        if self.etag is None or self.lost is not None:
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - never hide the error that ended the publish
            if isinstance(exc, OSError) and _s3_code(exc) not in _CONFLICT + (None,):
                with contextlib.suppress(Exception):  # a store without conditional deletes
                    current = self._current()
                    if current is not None and current[0] == self.etag:
                        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)

