"""The one exception type for bad user input, and how it reaches the user as one line.

A ``UserError`` carries a single line that names what is wrong and where (file, key,
column, layer, URI). The CLI prints it without a traceback and exits with status 2;
anything else is a bug and keeps its traceback.

A UserError raised inside a Ray task or actor, a Ray Train worker or a Tune trial comes
back to the driver wrapped (``RayTaskError``, ``WorkerGroupError``, ``TrainingFailedError``,
a trial's error): ``find_user_error`` digs the original out, so the user sees the same line
as when the same input is checked on the driver.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: a config key, a data file, a path, a layer, a bucket."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The ``UserError`` behind ``exc`` (itself, or the one a Ray task/actor, Train worker or Tune
    trial raised, however deeply wrapped), or None when there is none: then it is a bug."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        cur = queue.pop(0)
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)  # ray.exceptions.RayTaskError / RayActorError
        if isinstance(cur, UserError):
            # RayTaskError.as_instanceof_cause() makes a class that IS a UserError but prints a
            # traceback; the error the worker raised is its .cause
            return cause if isinstance(cause, UserError) else cur
        failures = getattr(cur, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> error
        nested = list(failures.values()) if isinstance(failures, dict) else []
        queue.extend([cause, getattr(cur, "controller_failure", None), *nested, cur.__cause__, cur.__context__])
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def guarded(run: Callable[[], int | None]) -> int:
    """Run a command: a ``UserError`` is one line on stderr and exit status 2, no traceback, also
    when a Ray task/actor, Train worker or Tune trial raised it (``find_user_error``)."""
    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        print("probe-dpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless a UserError is behind it
        user = find_user_error(exc)
        if user is None:
            raise
        print(f"probe-dpo: error: {one_line(user)}", file=sys.stderr)
        return 2
