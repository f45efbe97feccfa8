"""Append-only, crash-safe JSONL results store that makes eval and curation runs resumable.

Why JSONL with whole-line appends: one ``os.write`` of a complete line on an
``O_APPEND`` descriptor followed by ``fsync`` either lands entirely or leaves a partial
*last* line; a reader that drops an unterminated tail therefore never sees half a
record, and nothing already written is ever rewritten. A record is keyed by
``record["key"]``; when a key appears more than once the *last* line wins (a retried
failure supersedes the failed attempt). An exclusive ``flock`` on ``<file>.lock`` keeps
two runs from interleaving in one file.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
from typing import Any, Iterator


class ResultsStore:
    """Keyed JSONL records under ``path``; use as a context manager to hold the lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._lock_fd: int | None = None
        self._fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "ResultsStore":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(str(self.path) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(
                f"{self.path} is in use by another caspo run (lock {self.path}.lock); "
                "wait for it to finish, or give this run another output directory"
            ) from None
        self._drop_partial_tail()
        self._fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _drop_partial_tail(self) -> None:
        """Cut an unterminated last line left by a killed writer (we hold the lock)."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    # -- writing ---------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError("a results record needs a 'key' field")
        if self._fd is None:
            raise RuntimeError("ResultsStore.append outside `with store:`")
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # pragma: no cover - regular files write fully
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)

    # -- reading ---------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """Latest record per key, in first-seen key order."""
        return load_records(self.path)


def iter_lines(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Complete JSON lines of ``path``; an unterminated or corrupt last line is skipped."""
    p = pathlib.Path(path)
    if not p.exists():
        return
    data = p.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    del tail  # unterminated: a write that was cut off
    for n, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: corrupt results line ({e}); delete that line and rerun") from None


def load_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in iter_lines(path):
        out[rec["key"]] = rec
    return out
