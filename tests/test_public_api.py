"""``import finetune``: the names of the Python API, listed by ``dir()`` and each one there."""

import finetune


def test_dir_lists_the_api_and_every_listed_name_resolves():
    listed = dir(finetune)
    for name in ("run", "resume", "load_recipe", "build_model", "load_model", "predict", "RunCallback", "RunResult"):
        assert name in listed, name
    assert set(finetune._LAZY) <= set(finetune.__all__) <= set(listed)
    assert listed == sorted(listed)
    for name in finetune.__all__:
        assert getattr(finetune, name) is not None, name
    assert callable(finetune.run) and callable(finetune.load_recipe) and isinstance(finetune.RunCallback, type)
