"""Reading a recipe: YAML (safe), ``--set KEY=VALUE`` overrides, then the schema.

:func:`read_recipe` gives a schema-valid :class:`Recipe`; checks against the
registries (backbone names, optimizer settings, data sources) come on top in
:func:`finetune.load_recipe`.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import RecipeError
from finetune.files import is_file
from finetune.recipe.schema import Recipe


class _RecipeLoader(yaml.SafeLoader):
    """safe_load, but ``1e-5`` is a float as in YAML 1.2 (PyYAML reads it as a string)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "recipe") -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}:{where}: invalid YAML: {problem}") from None


#: A recipe file's path, or a recipe already parsed into a mapping.
RecipeSource = str | Path | Mapping[str, Any]
#: ``{"phases.head.epochs": 1}``, or ``["phases.head.epochs=1", ...]`` as ``--set`` gives them.
Overrides = Mapping[str, Any] | list[str] | None


def read_recipe(source: RecipeSource, overrides: Overrides = None) -> Recipe:
    """Read, override and validate a recipe against its schema.

    ``source`` is a YAML file or an already parsed mapping. ``overrides`` maps
    dotted paths to values (``{"phases.head.epochs": 1}``) or is a list of
    ``KEY=VALUE`` strings whose values are read as YAML.
    """
    label = source_label(source)
    if isinstance(source, Mapping):
        raw, default_name = copy.deepcopy(dict(source)), "recipe"
    else:
        path = Path(source)
        if not is_file(path):
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        raw = parse_yaml(path.read_text(), label)
        default_name = path.stem
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", default_name)
    for key, value in _normalize_overrides(overrides).items():
        set_path(raw, key, value)
    notices = _convert_decay(raw, label) + _convert_saved_model_flag(raw, label)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(f"{label}: {format_validation_error(error, raw)}") from None
    recipe.notices.extend(notices)
    return recipe


def source_label(source: RecipeSource) -> str:
    """How errors name a recipe: its file, or ``recipe`` for one given as a mapping."""
    return "recipe" if isinstance(source, Mapping) else str(Path(source))


def _convert_decay(raw: dict, label: str) -> list[str]:
    """The book's ``SGD(..., decay=d)`` becomes the power schedule it meant.

    Keras 3 accepts ``decay`` with a warning and then ignores it.
    """
    notices: list[str] = []
    phases = raw.get("phases")
    for phase in phases if isinstance(phases, list) else []:
        if not isinstance(phase, dict) or not isinstance(phase.get("optimizer"), dict):
            continue
        optimizer = phase["optimizer"]
        if "decay" not in optimizer:
            continue
        decay = optimizer.pop("decay")
        name = phase.get("name", "?")
        if decay in (None, 0):
            continue
        if not isinstance(decay, (int, float)) or decay < 0:
            raise RecipeError(f"{label}: phases.{name}.optimizer.decay: expected a positive number, got {decay!r}")
        if phase.get("schedule") is not None:
            raise RecipeError(
                f"{label}: phases.{name}: optimizer.decay and schedule both set the learning rate; keep one"
            )
        phase["schedule"] = {"name": "power", "s": 1.0 / float(decay), "c": 1.0}
        notices.append(
            f"phases.{name}.optimizer.decay={decay} (ignored by Keras 3 optimizers) became the power schedule "
            f"it meant: lr0 / (1 + {decay} * step), i.e. schedule: {{name: power, s: {1.0 / float(decay):g}, c: 1}}"
        )
    return notices


def _convert_saved_model_flag(raw: dict, label: str) -> list[str]:
    """The old ``export.saved_model: BOOL`` adds ``saved_model`` to ``export.formats`` or takes it out.

    With both keys (an old ``--set export.saved_model=false`` on a dumped recipe), the flag edits the list.
    """
    export = raw.get("export")
    if not isinstance(export, dict) or "saved_model" not in export:
        return []
    flag = export.pop("saved_model")
    if not isinstance(flag, bool):
        raise RecipeError(f"{label}: export.saved_model: expected true or false, got {flag!r}")
    formats = export.get("formats", ["keras", "saved_model"])
    if not isinstance(formats, list):
        return []  # the schema names the wrong type
    formats = [name for name in formats if name != "saved_model"] + (["saved_model"] if flag else [])
    export["formats"] = formats
    old = f"export.saved_model: {str(flag).lower()}"
    return [f"{old} is the old form of export.formats: read as [{', '.join(formats)}]"]


def _normalize_overrides(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_assignments(overrides, "--set", "phases.head.epochs=1")


def parse_assignments(items, flag: str, example: str) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` as a dict, each VALUE read as YAML (an empty one is null)."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        result[key.strip()] = parse_yaml(value, f"{flag} {key.strip()}") if value.strip() else None
    return result


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``value`` at a dotted path; list items (phases) are addressed by name."""
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _find_item(node, part, here)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last:
            _check_known_key(raw, parts, here)
            node[part] = value
            return
        if node.get(part) is None:
            _check_known_key(raw, parts[: depth + 1], here)
            node[part] = {}
        node = node[part]


def _find_item(items: list, key: str, here: str) -> int:
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    if key.isdigit() and int(key) < len(items):
        return int(key)
    names = [str(item.get("name")) for item in items if isinstance(item, dict)]
    raise RecipeError(f"--set {here}: no item named {key!r} (have: {', '.join(names)})")


def _check_known_key(raw: dict, parts: list[str], here: str) -> None:
    """Reject a --set path that names no recipe field, before validation."""
    if parts == ["export", "saved_model"]:
        return  # the old flag, still read (_convert_saved_model_flag)
    model: Any = Recipe
    index = 0
    while index < len(parts) and isinstance(model, type) and issubclass(model, BaseModel):
        if model.model_config.get("extra") == "allow":
            return  # free-form settings (optimizer arguments) are checked by Keras
        part = parts[index]
        fields = model.model_fields
        if part not in fields:
            raise RecipeError(f"--set {here}: unknown key {part!r} (known: {', '.join(fields)})")
        annotation = fields[part].annotation
        if typing.get_origin(annotation) is list:
            model = typing.get_args(annotation)[0]
            index += 2  # skip the item's name
        else:
            model = annotation
            index += 1


def format_validation_error(error: ValidationError, raw: Mapping[str, Any]) -> str:
    """Pydantic errors as one line, with phases named rather than numbered."""
    messages = []
    for item in error.errors():
        location = _readable_location(item["loc"], raw)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required"
        elif "input" in item and not isinstance(item["input"], (dict, list)):
            message = f"{message} (got {item['input']!r})"
        messages.append(f"{location}: {message}" if location else message)
    # Union types repeat one problem per alternative; keep the first of each location.
    seen, unique = set(), []
    for message in messages:
        key = message.split(":")[0]
        if key not in seen:
            seen.add(key)
            unique.append(message)
    return "; ".join(unique)


def _readable_location(location, raw) -> str:
    parts: list[str] = []
    node: Any = raw
    for part in location:
        if isinstance(part, int) and isinstance(node, list):
            item = node[part] if part < len(node) else None
            parts.append(str(item.get("name")) if isinstance(item, dict) and item.get("name") else str(part))
            node = item
        elif isinstance(part, str) and part in ("literal['none','all']", "TopBlocks", "int", "tuple[int, int]"):
            continue  # union branch labels
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)
