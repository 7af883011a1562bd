import pytest
from conftest import ROOT

import finetune
from finetune.errors import RecipeError
from finetune.plan import load_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.fixture(scope="module")
def book_model_a(tmp_path_factory):
    """A small finished run of recipes/book_transfer_a.yaml, for recipes that reuse it."""
    import finetune

    recipe = load_recipe(
        ROOT / "recipes" / "book_transfer_a.yaml",
        {"data.train_limit": 300, "data.test_limit": 100, "phases.train.epochs": 1, "training.verbose": 0},
    )
    return finetune.run(recipe, out=tmp_path_factory.mktemp("book") / "a", log=lambda _: None).run_dir


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, request):
    overrides = {}
    if "name: run" in path.read_text():  # it reuses a run folder that the README's commands create first
        overrides["model.backbone.path"] = str(request.getfixturevalue("book_model_a"))
    recipe = load_recipe(path, overrides)
    assert recipe.name
    assert recipe.phases


def test_flagship_recipe_has_head_then_lower_rate_finetune():
    recipe = load_recipe(ROOT / "recipes" / "xception_fmnist.yaml")
    head, tune = recipe.phase("head"), recipe.phase("finetune")
    assert recipe.model.backbone.name == "xception" and recipe.model.backbone.weights == "imagenet"
    assert head.trainable == "none"
    assert tune.trainable.top_blocks >= 1 and not tune.train_bn  # BatchNorm stays in inference mode
    assert tune.optimizer.learning_rate <= head.optimizer.learning_rate / 5  # the top blocks at a lower rate


def test_overrides_address_phases_by_name_and_parse_yaml(tiny_recipe_dict):
    recipe = load_recipe(
        tiny_recipe_dict,
        [
            "phases.finetune.epochs=3",
            "data.train_limit=null",
            "phases.head.optimizer.learning_rate=1e-4",
            "data.image_size=[40, 48]",
        ],
    )
    assert recipe.phase("finetune").epochs == 3
    assert recipe.data.train_limit is None
    assert recipe.phase("head").optimizer.learning_rate == pytest.approx(1e-4)
    assert recipe.data.image_hw == (40, 48)


def test_yaml_exponent_without_dot_is_a_float(tmp_path, tiny_recipe_dict):
    import yaml

    tiny_recipe_dict["phases"][0]["optimizer"]["learning_rate"] = "PLACEHOLDER"
    text = yaml.safe_dump(tiny_recipe_dict).replace("PLACEHOLDER", "3e-5")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).phase("head").optimizer.learning_rate == pytest.approx(3e-5)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"data.image_sizes": 96}, "unknown key 'image_sizes'"),
        ({"phases.nope.epochs": 1}, "no item named 'nope'"),
        ({"phases.head.epochs": -1}, "phases.head.epochs"),
        ({"phases.head.epochs": "many"}, "phases.head.epochs"),
        ({"data.validation_split": 1.5}, "data.validation_split"),
        ({"model.backbone.name": "xceptoin"}, "did you mean 'xception'"),
        ({"model.backbone.weights": "/nowhere/w.h5"}, "/nowhere/w.h5"),
        ({"phases.head.optimizer.name": "adamm"}, "unknown optimizer 'adamm'"),
        ({"phases.head.optimizer.momentum": 0.9}, "momentum"),
        ({"precision": "float8"}, "precision"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(tiny_recipe_dict, overrides, expected):
    with pytest.raises(RecipeError) as caught:
        load_recipe(tiny_recipe_dict, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_top_level_key_is_named(tiny_recipe_dict):
    tiny_recipe_dict["phase"] = []
    with pytest.raises(RecipeError, match="phase: unknown key"):
        load_recipe(tiny_recipe_dict)


def test_image_size_below_backbone_minimum(tiny_recipe_dict):
    tiny_recipe_dict["model"]["backbone"]["name"] = "xception"
    with pytest.raises(RecipeError, match="xception needs at least 71x71 inputs, got 32x32"):
        load_recipe(tiny_recipe_dict)


def test_duplicate_phase_names(tiny_recipe_dict):
    tiny_recipe_dict["phases"][1]["name"] = "head"
    with pytest.raises(RecipeError, match="duplicate phase name"):
        load_recipe(tiny_recipe_dict)


def test_resolved_recipe_round_trips(tmp_path, tiny_recipe):
    path = tmp_path / "resolved.yaml"
    path.write_text(tiny_recipe.to_yaml())
    assert load_recipe(path) == tiny_recipe


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nphases: [\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(path)


def test_import_api_exposes_the_pipeline():
    assert callable(finetune.load_recipe) and callable(finetune.run) and callable(finetune.build_model)


@pytest.mark.parametrize("phases", [3, "head", {"name": "head"}, None])
def test_phases_of_the_wrong_kind_are_one_line_errors(tiny_recipe_dict, phases):
    tiny_recipe_dict["phases"] = phases
    with pytest.raises(RecipeError) as caught:
        load_recipe(tiny_recipe_dict)
    assert str(caught.value).startswith("recipe: phases") and "\n" not in str(caught.value)


def test_building_from_a_recipe_file_resolves_it_once(monkeypatch):
    from finetune import plan

    calls = []
    resolve = plan.resolve
    monkeypatch.setattr(plan, "resolve", lambda recipe, label="recipe": calls.append(label) or resolve(recipe, label))
    finetune.build_model(ROOT / "recipes" / "ch11_adam.yaml")
    assert calls == [str(ROOT / "recipes" / "ch11_adam.yaml")]
