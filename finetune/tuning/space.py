"""The search space: YAML keyed by recipe paths as ``--set`` names them, each a range or a list of choices.

```yaml
phases.finetune.optimizer.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}
model.head.dropout: {low: 0.0, high: 0.5}
phases.finetune.epochs: {low: 2, high: 4}          # ints: suggest_int (step 1 unless given)
training.batch_size: [32, 64, 128]
model.backbone.cut_at: [block5c, block6d, null]
phases.finetune.schedule.name: [constant, cosine]
phases.finetune.schedule.warmup: {low: 0.0, high: 0.3, when: {phases.finetune.schedule.name: cosine}}
```

A key with ``when`` (``{KEY: value}`` or ``{KEY: [values]}``, KEY an earlier key of the space) is sampled
only in trials where KEY took one of those values, and keeps the base recipe's value in the others;
choices with a condition are written ``{choices: [...], when: {...}}``.

Every problem is a one-line RecipeError naming the key, before any trial starts; every value a key can
take is tried on the base recipe (through ``load_recipe``'s own ``--set`` path), so an unknown path or
a value the recipe refuses is found here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, RecipeError, first_line

_RANGE_KEYS = {"low", "high", "log", "step", "when"}


@dataclass(frozen=True)
class Dimension:
    """One key of the space: a numeric range (``low``, ``high``, ``log``, ``step``) or ``choices``."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None
    when: tuple[tuple[str, tuple], ...] = ()
    """(earlier key, the values that key must take for this one to be sampled), all of them to hold"""

    def applies(self, sampled: dict[str, Any]) -> bool:
        """Whether this key is sampled, given the values of the earlier keys in this trial."""
        return all(key in sampled and sampled[key] in allowed for key, allowed in self.when)

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(value, int) for value in (self.low, self.high))

    def suggest(self, trial) -> Any:
        """The value an Optuna ``trial`` suggests for this key (define-by-run)."""
        if self.choices is not None:
            # Optuna's categorical values are scalars: a list choice (an image size [64, 64]) travels as JSON.
            encoded = [value if _scalar(value) else json.dumps(value) for value in self.choices]
            picked = trial.suggest_categorical(self.key, encoded)
            return picked if picked in self.choices else json.loads(picked)
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=int(self.step or 1), log=self.log)
        assert self.low is not None and self.high is not None
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def edge_values(self) -> list:
        """The values checked against the recipe before the study starts: both ends, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def override(key: str, value: Any) -> str:
    """``KEY=VALUE`` as ``--set`` reads it (VALUE as YAML: JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def read_space(source: str | Path | dict) -> list[Dimension]:
    """The space in a YAML file (or a dict of it), each key's form checked; one line for the first problem."""
    if isinstance(source, dict):
        raw = source
    else:
        import yaml

        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"search space {path} does not exist") from None
        except yaml.YAMLError as error:
            raise RecipeError(f"search space {path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(raw, dict) or not raw:
        raise RecipeError("the search space must map recipe keys to a range {low, high} or a list of choices")
    dimensions: list[Dimension] = []
    for key, spec in raw.items():
        dimensions.append(_dimension(str(key), spec, {dimension.key: dimension for dimension in dimensions}))
    return dimensions


def _dimension(key: str, spec: Any, earlier: dict[str, Dimension]) -> Dimension:
    where = f"search space {key}"
    if isinstance(spec, dict) and "choices" in spec:
        if set(spec) - {"choices", "when"} or not isinstance(spec["choices"], list):
            raise RecipeError(f"{where}: conditional choices are {{choices: [...], when: {{KEY: value}}}}")
        plain = _dimension(key, spec["choices"], earlier)
        return Dimension(key, choices=plain.choices, when=_condition(where, spec.get("when"), earlier))
    if isinstance(spec, list):
        if not spec:
            raise RecipeError(f"{where}: an empty list of choices")
        return Dimension(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: give a range {{low: ..., high: ...}} or a list of choices, not {spec!r}")
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown or not {"low", "high"} <= set(spec):
        raise RecipeError(f"{where}: a range takes low and high (and log, step), not {sorted(spec)}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecipeError(f"{where}: {name} must be a number, not {value!r}")
    if not isinstance(log, bool):
        raise RecipeError(f"{where}: log must be true or false, not {log!r}")
    if low >= high:
        raise RecipeError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise RecipeError(f"{where}: a log range needs low > 0, not {low}")
    if step is not None and (step <= 0 or log):
        raise RecipeError(f"{where}: step must be positive, and cannot go with log")
    if isinstance(low, int) != isinstance(high, int):
        raise RecipeError(f"{where}: low {low!r} and high {high!r} must both be integers or both be decimals")
    return Dimension(key, low=low, high=high, log=log, step=step, when=_condition(where, spec.get("when"), earlier))


def _condition(where: str, when: Any, earlier: dict[str, Dimension]) -> tuple[tuple[str, tuple], ...]:
    """``when: {KEY: value or [values]}`` checked: KEY an earlier key of the space, each value one it can take."""
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise RecipeError(f"{where}: when takes {{KEY: value}} or {{KEY: [values]}}, not {when!r}")
    condition = []
    for other, values in when.items():
        parent = earlier.get(str(other))
        if parent is None:
            raise RecipeError(f"{where}: when names {other!r}, which is not an earlier key of the space")
        allowed = tuple(values) if isinstance(values, list) else (values,)
        if not allowed:
            raise RecipeError(f"{where}: when {other}: an empty list of values")
        for value in allowed:
            inside = value in parent.choices if parent.choices is not None else _within(parent, value)
            if not inside:
                raise RecipeError(f"{where}: when {other}: {value!r} is not a value {other} can take")
        condition.append((str(other), allowed))
    return tuple(condition)


def _within(dimension: Dimension, value: Any) -> bool:
    assert dimension.low is not None and dimension.high is not None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dimension.low <= value <= dimension.high


def check_against(dimensions: list[Dimension], base: str | Path, fixed: list[str]) -> None:
    """Each key's edge values applied to the base recipe (with ``fixed`` overrides) through ``load_recipe``:
    an unknown path or a value the recipe refuses is one line naming the key."""
    from finetune.plan import load_recipe

    for dimension in dimensions:
        # A conditional key is tried with the keys it depends on set to a value that samples it.
        context = [override(key, allowed[0]) for key, allowed in dimension.when]
        for value in dimension.edge_values():
            try:
                load_recipe(base, [*fixed, *context, override(dimension.key, value)])
            except FinetuneError as error:
                raise RecipeError(f"search space {dimension.key}: {first_line(error)}") from None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
