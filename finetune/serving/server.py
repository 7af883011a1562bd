"""``finetune serve``: the model loaded and tried, the port bound, then uvicorn answering until Ctrl-C."""

from __future__ import annotations

import gc
import logging
import re
import socket
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError, ModelError, first_line
from finetune.inference.predictor import Predictor, load_predictor
from finetune.serving.app import ServeSettings, create_app

log = logging.getLogger("finetune")

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def model_name_for(path: Path) -> str:
    """The recipe's ``name`` from the run folder's recipe.yaml, else the folder's own name."""
    folder = path if path.is_dir() else path.parent
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            name = yaml.safe_load(recipe.read_text()).get("name")
        except Exception:  # noqa: BLE001 - an unreadable recipe only loses the name
            name = None
        if isinstance(name, str) and _MODEL_NAME.fullmatch(name):
            return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip("-.")
    return cleaned or "model"


def load_for_serving(path: str | Path) -> Predictor:
    """The model, loaded and run on blank images: a model that cannot answer fails before a port opens.

    Batches of 1, 2 and 3 images: the compiled predict function traces again for a new batch size until
    it has seen two (then it takes any), and a trace in the middle of serving cost a request ~250 ms."""
    predictor = load_predictor(path)
    try:
        for size in (1, 2, 3):
            predictor.predict(np.zeros((size, *predictor.spec.shape), np.uint8))
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"the model in {path} loads but cannot predict: {first_line(error)}") from None
    return predictor


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or one line saying why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only for sockets that say so, and with it
        # on, each answer waits ~40 ms for the client's delayed ACK.
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        raise FinetuneError(f"cannot listen on {host}:{port}: {error.strerror or first_line(error)}") from None
    listener.set_inheritable(True)
    return listener


def serve(path: str | Path, settings: ServeSettings | None = None, host: str = "127.0.0.1", port: int = 8501) -> None:
    """Serve the model at ``path`` (a run folder, ``.keras`` file or SavedModel folder) until interrupted."""
    import uvicorn

    path = Path(path)
    predictor = load_for_serving(path)
    settings = settings or ServeSettings(model_name=model_name_for(path))
    if not _MODEL_NAME.fullmatch(settings.model_name):
        raise FinetuneError(f"model name {settings.model_name!r}: use letters, digits, '.', '_' and '-'")
    for note in predictor.notes:
        log.info(f"note: {note}")
    listener = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{listener.getsockname()[1]}"
    log.info(
        f"serving {settings.model_name} ({len(predictor.spec.class_names)} classes, {predictor.kind}) at {url}/ "
        f"- TF Serving API {url}/v1/models/{settings.model_name}:predict, files {url}/predict"
        f"{', API key required' if settings.api_key else ''}"
    )
    app = create_app(predictor, settings)
    # Everything loaded so far (TensorFlow, Keras, the model: millions of objects) moves out of the garbage
    # collector's sight: a full collection scanned them all, and the requests in flight waited ~250 ms.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[listener])
