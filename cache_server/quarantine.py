"""Nothing stored can stop a start: a state file the server cannot read is moved aside, logged and
listed in ``/health``, and the server starts with the rest.

A file is moved, never deleted (``<root>/quarantine/<kind>/<name>``): an operator can look at it,
repair it and put it back. A dataset is not moved (it may be gigabytes, or live in a bucket): it is
left where it is, listed, and answered as unreadable.
"""

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from shared.schemas import SkippedFile

log = logging.getLogger("cache_server.quarantine")
T = TypeVar("T")


def reason_of(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message (a validation error's first
    problem, with where it is)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{exc.error_count()} validation error(s), first at {where or 'the top'}: {first.get('msg')}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Quarantine:
    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "quarantine"
        self._skipped: list[SkippedFile] = []
        self._lock = threading.Lock()

    def put(self, path: Path, kind: str, reason: str) -> None:
        """Move ``path`` (if it is there) aside and remember why."""
        moved_to = None
        if path.exists():
            target = self.folder / kind / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 1
            while target.exists():  # a second bad file of the same name keeps the first
                target, n = self.folder / kind / f"{path.name}.{n}", n + 1
            os.replace(path, target)
            moved_to = str(target.relative_to(self.root))
        self.note(str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path), kind, reason,
                  moved_to)

    def note(self, path: str, kind: str, reason: str, moved_to: str | None = None) -> None:
        """Remember a stored thing the server skipped without moving it."""
        log.error("skipped %s %s: %s%s", kind, path, reason, f" (moved to {moved_to})" if moved_to else "")
        with self._lock:
            if not any(s.path == path and s.reason == reason for s in self._skipped):
                self._skipped.append(SkippedFile(path=path, kind=kind, reason=reason, moved_to=moved_to))

    def load(self, path: Path, kind: str, read: Callable[[bytes], T]) -> T | None:
        """``read(path's bytes)``, or None after quarantining a file it fails on."""
        try:
            return read(path.read_bytes())
        except Exception as exc:  # any way a file can be bad: truncated, not JSON, not the schema
            self.put(path, kind, reason_of(exc))
            return None

    def skipped(self) -> list[SkippedFile]:
        with self._lock:
            return list(self._skipped)
