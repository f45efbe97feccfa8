"""On-disk cache of chat completions keyed by (model, namespace, request hash).

One JSON file per entry at `<dir>/<model>/<namespace>/<hash[:2]>/<hash>.json`, written to
a temporary file and renamed, so a crash or two concurrent writers never leave a torn
entry. Entries hold the completion text and usage only: never headers or keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "request_hash"]


def request_hash(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the completion."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _safe_component(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"
    return cleaned[:100]


class ResponseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model: str, namespace: str, key: str) -> Path:
        return (
            self.root / _safe_component(model) / _safe_component(namespace or "default")
            / key[:2] / f"{key}.json"
        )

    def get(self, model: str, namespace: str, key: str) -> dict[str, Any] | None:
        path = self.path(model, namespace, key)
        try:
            with path.open("r", encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable entry: treat as a miss, it will be rewritten
        if entry.get("key") != key or entry.get("model") != model:
            return None
        return entry

    def put(self, model: str, namespace: str, key: str, entry: dict[str, Any]) -> None:
        path = self.path(model, namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "model": model, "namespace": namespace, **entry}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
