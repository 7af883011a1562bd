"""Every bad recipe gets a one-line answer: valid, or exit code 2 and one line naming the problem.

Hypothesis mutates the shipped recipes (wrong types, unknown keys, out-of-range and huge numbers,
missing sections, empty lists, odd unicode) and runs `finetune validate` on each. None may end in
a traceback, an exit code other than 0 or 2, or a hang. ``FUZZ_EXAMPLES`` sets how many recipes
are tried (200 by default).
"""

import copy
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finetune.cli import main

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BASES = {path.name: yaml.safe_load(path.read_text()) for path in RECIPES}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))

odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),  # any unicode, control characters included
    st.sampled_from(["", "  ", "none", "all", "auto", "adam", "imagenet", "\u202e", "x" * 500, "1e999", "-1"]),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=3),
    st.just([]),
    st.just({}),
    st.dictionaries(st.sampled_from(["name", "epochs", "top_blocks", "x"]), st.integers(-2, 5), max_size=2),
)


def _paths(node, prefix=()):
    """Every key path into the recipe (dict keys and list positions)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutate(recipe, path, how, value, key):
    recipe = copy.deepcopy(recipe)
    if not path:
        return value if how == "replace" else recipe
    parent = recipe
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "add_key" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif how == "empty":
        parent[last] = [] if isinstance(parent[last], list) else {}
    return recipe


@st.composite
def mutated_recipes(draw):
    name = draw(st.sampled_from(sorted(BASES)))
    recipe = BASES[name]
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(recipe))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "replace", "delete", "add_key", "empty"]))
        key = draw(st.text(min_size=1, max_size=8))
        recipe = _mutate(recipe, path, how, draw(odd_values), key)
    return name, recipe


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(case=mutated_recipes())
def test_a_mutated_recipe_is_valid_or_refused_in_one_line(tmp_path_factory, case):
    name, recipe = case
    path = Path(tmp_path_factory.mktemp("fuzz")) / name
    try:
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    except yaml.YAMLError:
        pytest.skip("not representable as YAML")
    result = CliRunner().invoke(main, ["validate", str(path)], catch_exceptions=True)
    shown = f"{name}: {recipe!r}\n{result.output}"
    event(f"exit code {result.exit_code}")
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert result.exit_code in (0, 2), shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
