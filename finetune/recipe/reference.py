"""The recipe's reference, from its pydantic models: the JSON schema, and a table of every key.

``finetune schema`` prints the schema; ``finetune schema --markdown`` prints the table that the
README's recipe reference holds between its markers (a test fails when the two drift apart).
"""

from __future__ import annotations

import json
from typing import Any

from finetune.recipe.schema import Recipe

README_START = "<!-- recipe-reference:start (finetune schema --markdown) -->"
README_END = "<!-- recipe-reference:end -->"


def json_schema() -> dict:
    """The recipe's JSON schema (draft 2020-12), as pydantic states it."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def reference_rows() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` for every key; list items are written ``phases[].name``."""
    schema = json_schema()
    rows: list[tuple[str, str, str, str]] = []
    _walk(schema, schema, "", rows)
    return rows


def markdown_table() -> str:
    lines = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in reference_rows():
        cells = (f"`{key}`", kind, default, description)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def readme_section(readme: str) -> str | None:
    """The table between the README's markers, or None when the markers are missing."""
    if README_START not in readme or README_END not in readme:
        return None
    return readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()


def _walk(node: dict, root: dict, prefix: str, rows: list) -> None:
    required = set(node.get("required", ()))
    for name, field in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        target = _resolve(field, root)
        if _is_section(target):
            _walk(target, root, key + ".", rows)
            continue
        items = _resolve(target.get("items", {}), root) if target.get("type") == "array" else {}
        if _is_section(items):
            _walk(items, root, key + "[].", rows)
            continue
        default = "required" if name in required else _default(field, target)
        rows.append((key, _type(field, root), default, field.get("description", target.get("description", ""))))


def _resolve(node: dict, root: dict) -> dict:
    reference = node.get("$ref")
    if reference is None:
        return node
    target: Any = root
    for part in reference.lstrip("#/").split("/"):
        target = target[part]
    return target


def _is_section(node: dict) -> bool:
    # A nested model whose keys are listed one by one (not a plugin's free-form settings).
    return node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is False


def _type(node: dict, root: dict) -> str:
    node = _resolve(node, root)
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " | ".join(json.dumps(value) if not isinstance(value, str) else value for value in node["enum"])
    if "anyOf" in node:
        kinds: list[str] = []
        for option in node["anyOf"]:
            option_kind = _type(option, root)
            if option_kind not in kinds:
                kinds.append(option_kind)
        return " or ".join(kinds)
    kind = node.get("type")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), root)}" if node.get("items") else "list"
    if kind == "object":
        if "properties" in node:
            return "{" + ", ".join(node["properties"]) + "}"
        return "mapping"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}.get(
        str(kind), str(kind or "any")
    )


def _default(field: dict, target: dict) -> str:
    if "default" in field or "default" in target:
        value = field.get("default", target.get("default"))
        if value is None:
            return "null"
        return json.dumps(value) if not isinstance(value, str) else value
    # A default_factory: pydantic states no default, so say what the factory makes.
    if target.get("type") == "array":
        return "[]"
    defaults = {name: prop["default"] for name, prop in target.get("properties", {}).items() if "default" in prop}
    return json.dumps(defaults) if defaults else "{}"
