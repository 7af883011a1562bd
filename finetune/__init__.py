"""finetune: recipe-driven transfer learning for Keras 3.

import finetune
recipe = finetune.load_recipe("recipes/xception_fmnist.yaml", overrides={"phases.head.epochs": 1})
result = finetune.run(recipe, out="runs/x")   # result.metrics, result.model, result.run_dir
result = finetune.resume("runs/x")               # an interrupted or killed run goes on
result = finetune.run("recipe.yaml", overrides=["phases.head.epochs=1"], log=None)  # lines to `logging` only
model = finetune.build_model(recipe)
model = finetune.load_model("runs/x/model.keras")
for prediction in finetune.predict("runs/x", ["shirt.jpg", "photos/"], top=3):   # .path, .top, .inverted, .error
    print(prediction.path, prediction.top[0] if prediction.top else prediction.error)
"""

from __future__ import annotations

from typing import Any

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe

__version__ = "0.2.0"

__all__ = [
    "FinetuneError",
    "Recipe",
    "RecipeError",
    "RunCallback",
    "RunResult",
    "__version__",
    "build_model",
    "load_model",
    "load_recipe",
    "predict",
    "resume",
    "run",
]

# Where each public name lives; the module is imported on first use, so `import finetune`
# loads neither Keras nor TensorFlow.
_LAZY = {
    "load_recipe": "finetune.plan",
    "build_model": "finetune.model",
    "load_model": "finetune.model",
    "predict": "finetune.inference",
    "run": "finetune.runner",
    "resume": "finetune.runner",
    "RunResult": "finetune.runner",
    "RunCallback": "finetune.catalog.callbacks",
}


def __dir__() -> list[str]:
    # The lazy names too: what `dir(finetune)` and an editor's completion list, without importing them.
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
