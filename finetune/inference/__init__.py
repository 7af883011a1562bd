"""Using a trained model: predictions on image files, from a run folder or an exported SavedModel.

``predict(model, images, top=5)`` gives each file's top classes; ``load_predictor(model)``
loads a model once for many calls of :func:`predict`.
"""

from finetune.inference.classify import Prediction, predict, predict_files
from finetune.inference.predictor import Predictor, load_predictor

__all__ = ["Prediction", "Predictor", "load_predictor", "predict", "predict_files"]
