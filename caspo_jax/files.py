"""Reading a user's YAML / JSON file with one kind of error message everywhere.

Every loader of a user-supplied file (configs, constitutions, prompt templates,
benchmark exports) needs the same three checks -- the file exists, it parses, its top
level has the expected type -- and each must name the file and say what was expected.

    data = read_structured(path, dict, what="constitution file", error=ConstitutionError,
                           expected="a mapping of category -> text")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_structured"]


def read_structured(path: str | Path, kind: type | tuple[type, ...], *, what: str, expected: str,
                    error: type[Exception] = ValueError, empty: Any = None) -> Any:
    """The parsed contents of ``path``: JSON for ``*.json``, YAML (a JSON superset) otherwise.

    Raises ``error`` (``FileNotFoundError`` when ``error`` is ``ValueError``) with
    "<path>: <what> not found", "<path>: not valid JSON/YAML (...)" or
    "<path>: expected <expected>, got <type>". ``empty`` replaces an empty YAML file
    (None keeps it an error when None is not of ``kind``).
    """
    path = Path(path)
    as_json = path.suffix.lower() == ".json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        missing = FileNotFoundError if error is ValueError else error
        raise missing(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory; expected the {what}") from None
    try:
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise error(f"{path}: not valid {'JSON' if as_json else 'YAML'} ({exc})") from None
    if data is None and empty is not None:
        data = empty
    if not isinstance(data, kind):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data
