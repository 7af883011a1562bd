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

import os
import platform
from typing import Any

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe

__version__ = "0.2.0"


def _prefer_onednn() -> None:
    """Turn on TensorFlow's oneDNN CPU kernels on x86-64 unless the user chose (read when TensorFlow loads).

    TensorFlow enables them by default only on CPUs with AVX-512 VNNI or newer; without them a
    separable convolution's gradient runs about 4x slower on other x86 CPUs (AMD EPYC, older Intel),
    which is most of a fine-tuning step for Xception's top blocks (docs/performance.md, measured
    with scripts/onednn_bench.py). It changes nothing once TensorFlow is imported, or on another backend.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


_prefer_onednn()

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
    "tune",
]

# Where each public name lives; the module is imported on first use, so `import finetune`
# loads neither Keras nor TensorFlow.
_LAZY = {
    "load_recipe": "finetune.plan",
    "build_model": "finetune.model",
    "load_model": "finetune.model",
    "predict": "finetune.inference",
    "run": "finetune.runner.pipeline",
    "resume": "finetune.runner.resume",
    "RunResult": "finetune.runner.conclude",
    "RunCallback": "finetune.catalog.callbacks",
    "tune": "finetune.tuning",
}


def __dir__() -> list[str]:
    # The lazy names too: what `dir(finetune)` and an editor's completion list, without importing them.
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
