"""One configuration point for the project's log lines: ``[component HH:MM:SS] message``.

Library modules log through ``logging.getLogger(__name__)``; nothing in the library prints
its progress or takes a ``log=`` callable. Entry points (the CLI, a workflow run as a Ray
job, a Ray worker that does the work) call ``setup()`` once, which sends ``probe_dpo``'s
INFO lines to stderr (``PROBE_DPO_LOG_LEVEL`` changes the level); a library user who wants
them calls it too, or configures ``logging`` as they like.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "probe_dpo"


class _Format(logging.Formatter):
    """``[toxicity 07:12:38] message``: the module's last name, the time, the message."""

    def format(self, record: logging.LogRecord) -> str:
        record.component = record.name.rsplit(".", 1)[-1]
        return super().format(record)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (a redirected or captured
    stream), as ``logging.lastResort`` does, not to the stream of the first ``setup()``."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def setup(level: int | str | None = None) -> logging.Logger:
    """Send the project's log lines to stderr (once per process; later calls set the level)."""
    logger = logging.getLogger(ROOT)
    if not any(getattr(h, "_probe_dpo", False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format("[%(component)s %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        handler._probe_dpo = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level or os.environ.get("PROBE_DPO_LOG_LEVEL", "INFO"))
    return logger
