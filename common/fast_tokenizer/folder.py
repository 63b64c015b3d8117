"""Reading a model folder's tokenizer files: tokenizer.json, tokenizer_config.json and the chat templates.

Every unreadable or corrupt file raises CheckpointError naming it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import CheckpointError


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"unreadable {what} {str(path)!r}: {e}") from e


def read_tokenizer_files(folder: Path) -> tuple[dict, dict]:
    """(tokenizer_config.json, tokenizer.json) of a folder as JSON objects; a missing config is {}."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: tokenizer.json is missing")
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, "tokenizer config") if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"unreadable tokenizer config {str(config_file)!r}: not a JSON object")
    spec = read_json(tokenizer_file, "tokenizer")
    if not isinstance(spec, dict):
        raise CheckpointError(f"unreadable tokenizer {str(tokenizer_file)!r}: not a JSON object")
    return config, spec


def read_chat_templates(folder: Path, config: Mapping) -> str | dict[str, str] | None:
    """The chat template(s) as transformers loads them: standalone .jinja files win over tokenizer_config.json."""
    templates: dict[str, str] = {}
    default_file = folder / "chat_template.jinja"
    try:
        if default_file.is_file():
            templates["default"] = default_file.read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable chat template in {str(folder)!r}: {e}") from e
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {t["name"]: t["template"] for t in template}
    return template
