"""Serving a trained model over HTTP: TF Serving's REST API, image uploads, a page to try it, metrics.

``serve(run_dir)`` runs the server (``finetune serve``); ``create_app(predictor, settings)`` is the ASGI
app itself, for an ASGI server of one's own choosing.
"""

from finetune.serving.app import ServeSettings, create_app
from finetune.serving.server import load_for_serving, model_name_for, serve

__all__ = ["ServeSettings", "create_app", "load_for_serving", "model_name_for", "serve"]
