"""Where storage goes: the S3 filesystem this process uses (endpoint, bounded retries, credentials
only from the environment) and how a backend's failure becomes one line naming the URI.

Split from ``probe_dpo.storage``, which imports this module (never the reverse).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator

import fsspec
import s3fs

from probe_dpo.errors import UserError

LOCAL_PROTOCOLS = (None, "file", "local")
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
_CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
_FS_CACHE: dict[tuple, Any] = {}


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


def s3_filesystem() -> Any:
    """This process's S3 filesystem for the current settings (re-created when they change)."""
    from probe_dpo.ray_utils import load_passed_credentials

    load_passed_credentials()  # a job's driver given credentials by cluster/submit.sh --pass-credentials
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


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec ``storage_options`` for a library that opens ``uri`` itself (``datasets.load_dataset``,
    ``load_from_disk``): the same endpoint and retry settings this process's S3 filesystem uses;
    credentials stay in the environment, where botocore reads them. Empty for other protocols."""
    if protocol_of(uri) not in ("s3", "s3a"):
        return {}
    from probe_dpo.ray_utils import load_passed_credentials

    load_passed_credentials()
    options: dict[str, Any] = {"config_kwargs": {
        "connect_timeout": _env_number("PROBE_DPO_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, float),
        "read_timeout": READ_TIMEOUT, "retries": {"total_max_attempts": _max_attempts(), "mode": "standard"}}}
    if _endpoint():
        options["endpoint_url"] = _endpoint()
    return options


def protocol_of(uri: str) -> str | None:
    protocol, _ = fsspec.core.split_protocol(os.fspath(uri))
    return protocol


def is_remote(uri: str) -> bool:
    """True for ``s3://`` and any other non-local fsspec protocol."""
    return protocol_of(uri) not in LOCAL_PROTOCOLS


def _scrub(text: str) -> str:
    for var in _CRED_VARS[:3]:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def service_name(uri: str) -> str:
    if protocol_of(uri) in ("s3", "s3a"):
        return f"S3 endpoint {_endpoint() or '(AWS default)'}"
    return f"the {protocol_of(uri)} service"


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
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
            return ("no S3 credentials found (set them in the environment, a credentials file or an "
                    "instance role: cluster/README.md)")
        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            return f"cannot reach {service_name(uri)} after {_max_attempts()} attempts ({type(exc).__name__})"
        if isinstance(exc, bexc.ClientError):  # one s3fs did not translate
            error = exc.response.get("Error", {})
            return f"S3 error {error.get('Code', '?')} at {service_name(uri)}: {_flat_text(error.get('Message') or text)}"
        if isinstance(exc, bexc.BotoCoreError):
            return f"S3 request failed at {service_name(uri)} ({type(exc).__name__}: {_flat_text(text)})"
    if isinstance(exc, FileNotFoundError):
        if remote and ("bucket does not exist" in text or "NoSuchBucket" in text):
            bucket = uri.split("://", 1)[1].split("/", 1)[0]
            return f"bucket '{bucket}' does not exist at {service_name(uri)}"
        return "not found"
    if isinstance(exc, PermissionError):
        if remote:
            return f"access denied at {service_name(uri)} (check the storage credentials of this machine)"
        return "permission denied"
    if isinstance(exc, OSError):
        return _flat_text(exc.strerror or text or type(exc).__name__)
    return None


def _flat_text(text: str, limit: int = 240) -> str:
    """``text`` on one line (botocore puts the reason on the line after "...failed:")."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
