"""finetune: recipe-driven transfer learning for Keras 3.

    import finetune
    recipe = finetune.load_recipe("recipes/xception_fmnist.yaml", overrides={"phases.head.epochs": 1})
    result = finetune.run(recipe, out="runs/x")   # result.metrics, result.model, result.run_dir
    model = finetune.build_model(recipe)
    model = finetune.load_model("runs/x/model.keras")
"""

from __future__ import annotations

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "FinetuneError", "Recipe", "RecipeError", "RunResult", "build_model", "load_model", "load_recipe", "run",
    "__version__",
]


def __getattr__(name: str):
    # Keras (and TensorFlow) load only when something needs them.
    if name in ("build_model", "load_model"):
        from finetune import model

        return getattr(model, name)
    if name in ("run", "RunResult"):
        from finetune import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
