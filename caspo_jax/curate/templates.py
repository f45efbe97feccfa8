"""The versioned prompt files of `caspo curate` (YAML, user-editable).

Shipped as `prompt_<name>.yaml` next to this module (a sub-folder without `__init__.py`
would not be packaged by `tool.setuptools.package-data`).

Each file has a `version` (stored with every output line and used as the response-cache
namespace, so an edited prompt never reuses answers given to the old wording) and one or
more `{system, user}` templates. Placeholders are `{{name}}` (double braces, so the JSON
examples inside a prompt need no escaping); an unknown or missing placeholder is an error
naming the file and the template.

The wording of every shipped prompt is ours: the paper (appendix C.1) describes its
curation prompts but does not print them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from caspo_jax.files import read_structured
from caspo_jax.llm.messages import system_message, user_message

__all__ = ["PROMPTS_DIR", "PromptFile", "PromptFileError", "Template", "load_prompt_file", "render"]

PROMPTS_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file, the field and the fix."""


def render(text: str, fields: Mapping[str, Any], where: str = "template") -> str:
    """Replaces every `{{name}}` in `text` by `fields[name]`; a missing field is an error."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in fields:
            raise PromptFileError(f"{where}: placeholder {{{{{name}}}}} has no value; known: {sorted(fields)}")
        return str(fields[name])

    return _PLACEHOLDER.sub(sub, text)


@dataclasses.dataclass(frozen=True)
class Template:
    """One chat prompt: a system text and a user text with `{{placeholders}}`."""

    system: str
    user: str
    where: str

    def messages(self, **fields: Any) -> list[dict[str, Any]]:
        """[system, user] chat messages with every placeholder filled from `fields`."""
        return [
            system_message(render(self.system, fields, f"{self.where}.system")),
            user_message(render(self.user, fields, f"{self.where}.user")),
        ]


@dataclasses.dataclass(frozen=True)
class PromptFile:
    """A parsed prompt file: its version, templates by name, and any other data (examples)."""

    path: Path
    version: str
    templates: dict[str, Template]
    data: dict[str, Any]

    def template(self, name: str) -> Template:
        if name not in self.templates:
            raise PromptFileError(f"{self.path}: no template {name!r}; add a '{name}: {{system, user}}' entry")
        return self.templates[name]


def load_prompt_file(name_or_path: str | Path, required: tuple[str, ...] = ()) -> PromptFile:
    """A shipped prompt file by stem ("synthesize") or a user's YAML file by path.

    required: template names that must be present (each a mapping with `system`, `user`).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPTS_DIR / f"prompt_{name_or_path}.yaml"
    data = read_structured(path, dict, what="prompt file", expected="a mapping with 'version' and templates",
                           error=PromptFileError)
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PromptFileError(f"{path}: field 'version' is missing; give the file a version string and bump it on every edit")
    templates: dict[str, Template] = {}
    for key, value in data.items():
        if isinstance(value, dict) and "user" in value:
            system, user = value.get("system", ""), value["user"]
            if not isinstance(system, str) or not isinstance(user, str) or not user.strip():
                raise PromptFileError(f"{path}: field '{key}' needs text 'system' and non-empty text 'user'")
            templates[key] = Template(system.strip(), user.strip(), f"{path}:{key}")
    missing = [t for t in required if t not in templates]
    if missing:
        raise PromptFileError(f"{path}: missing template(s) {missing}; each is a mapping with 'system' and 'user' text")
    return PromptFile(path, version.strip(), templates, data)
