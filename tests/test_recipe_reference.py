"""The recipe's JSON schema and the README's table of every key come from the same models."""

import json

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from finetune.cli import main
from finetune.recipe import Recipe
from finetune.recipe.reference import json_schema, markdown_table, readme_section, reference_rows


def test_the_readme_table_is_the_generated_one():
    section = readme_section((ROOT / "README.md").read_text())
    assert section is not None, "README.md lost its recipe-reference markers"
    assert section == markdown_table(), "README.md's recipe reference is stale: paste `finetune schema --markdown`"


def test_every_section_and_key_of_the_models_is_in_the_table():
    keys = {row[0] for row in reference_rows()}
    for section in ("data", "training", "evaluation", "export"):
        fields = type(getattr(Recipe(phases=[{"name": "a", "epochs": 1}]), section)).model_fields
        for name in fields:  # a key, or a nested section listed key by key
            key = f"{section}.{name}"
            assert key in keys or any(listed.startswith(key + ".") for listed in keys), key
    assert {"name", "seed", "precision", "phases[].name", "phases[].optimizer", "model.backbone.cut_at"} <= keys


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_satisfies_the_printed_schema(path):
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(result.output))


def test_the_schema_refuses_what_the_loader_refuses():
    schema = json_schema()
    recipe = {"phases": [{"name": "head", "epochs": 1}], "training": {"batch_sise": 32}}
    with pytest.raises(jsonschema.ValidationError, match="batch_sise"):
        jsonschema.validate(recipe, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"phases": [{"name": "head", "epochs": -1}]}, schema)


def test_every_default_the_reference_states_is_the_one_a_recipe_gets():
    import finetune

    # What a recipe that leaves every key out gets, as the loader reads it (the dumped models' values).
    recipe = finetune.load_recipe({"phases": [{"name": "a", "epochs": 1}]}).model_dump(mode="json")
    for key, _, stated, _ in reference_rows():
        if stated == "required":
            continue
        value = recipe
        for part in key.split("."):
            value = value[part.removesuffix("[]")]
            if part.endswith("[]"):
                value = value[0]
        if value is None:
            real = "null"
        else:
            real = value if isinstance(value, str) else json.dumps(value)
        assert stated == real, key
    assert recipe["export"]["formats"] == ["keras", "saved_model"]  # what a recipe without `export` has exported
    assert json_schema()["$defs"]["ExportConfig"]["properties"]["formats"]["default"] == ["keras", "saved_model"]
