"""The ASGI app: TF Serving's REST API, file uploads, the page, health and metrics, on Starlette."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from finetune.errors import first_line
from finetune.inference.explain import explain_predictor, no_heatmap_reason, overlay, viewing_scale
from finetune.inference.predictor import Predictor
from finetune.serving.batching import DynamicBatcher
from finetune.serving.payloads import BadRequest, decode_image, parse_json, tensorflow_serving_images
from finetune.serving.telemetry import Telemetry

log = logging.getLogger("finetune")

INPUT_NAME = "images"  # the input's name in the model and in its SavedModel's signature
_MODEL_VERSION = "1"
_INVERT_CHOICES = ("auto", "yes", "no")
_INLINE_BYTES = 256 * 1024  # bodies up to this size are decoded on the event loop itself
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """What ``finetune serve``'s options set; sizes in bytes, pixels and images."""

    model_name: str
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_body: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # ~7,000 x 7,000: a bigger upload is refused before it is decoded
    max_files: int = 256
    api_key: str | None = None


Handler = Callable[[Request], Awaitable[Response]]


def create_app(predictor: Predictor, settings: ServeSettings) -> Starlette:
    """The server for ``predictor``'s model: every answer JSON, every refusal ``{"error": "one line"}``."""
    telemetry = Telemetry()
    batcher = DynamicBatcher(
        predictor.predict, settings.max_batch, settings.max_delay_ms / 1000, on_batch=telemetry.batch
    )
    spec = predictor.spec
    no_heatmap = no_heatmap_reason(predictor)

    def endpoint(route: str, handler: Handler, *, public: bool = False, page: bool = False) -> Handler:
        async def answer(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if not public:
                    _authorize(request, settings.api_key, page)
                response = await handler(request)
            except BadRequest as refusal:
                response = _refused(request, refusal.status, refusal.message, page)
            except Exception as error:  # noqa: BLE001 - one failing request must not stop the server
                response = _refused(request, 500, f"the server failed on this request: {first_line(error)}", page)
            telemetry.answered(route, response.status_code, time.perf_counter() - started)
            return response

        return answer

    async def page(request: Request) -> Response:
        return HTMLResponse(resources.files("finetune.serving").joinpath("page.html").read_text())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": settings.model_name})

    async def metrics(request: Request) -> Response:
        return Response(telemetry.text(), media_type=telemetry.content_type)

    async def model_status(request: Request) -> Response:
        _, version, verb = _model_path(request.path_params["rest"], settings.model_name)
        if verb is not None:
            raise BadRequest(405, f"{verb} takes POST")
        if version == "metadata":
            return JSONResponse(_metadata(settings.model_name, spec))
        state = {"version": _MODEL_VERSION, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        return JSONResponse({"model_version_status": [state]})

    async def model_predict(request: Request) -> Response:
        _, _, verb = _model_path(request.path_params["rest"], settings.model_name)
        if verb != "predict":
            raise BadRequest(404, f"unknown method {verb or request.url.path!r}: this server has :predict")
        with batcher.arriving():
            body = await _read_body(request, settings.max_body)
            invert = _invert(request)
            images, answer_key = await _off_loop_if_large(
                len(body),
                lambda: tensorflow_serving_images(parse_json(body), spec, INPUT_NAME, invert, settings.max_pixels),
            )
        probabilities = await batcher.predict(images)
        return JSONResponse({answer_key: probabilities.tolist()})

    async def predict_files(request: Request) -> Response:
        with batcher.arriving():
            uploads = await _uploads(request, settings)
            invert, top = _invert(request), _top(request, len(spec.class_names))
            decoded = await _off_loop_if_large(
                sum(len(data) for _, data in uploads),
                lambda: [decode_image(data, name, spec, invert, settings.max_pixels) for name, data in uploads],
            )
        probabilities = await batcher.predict(np.stack([picture for picture, _ in decoded]))
        answers = [
            _file_answer(name, row, inverted, predictor, top)
            for (name, _), row, (_, inverted) in zip(uploads, probabilities, decoded, strict=True)
        ]
        return JSONResponse({"predictions": answers})

    async def explain_file(request: Request) -> Response:
        if no_heatmap is not None:
            raise BadRequest(404, no_heatmap)
        with batcher.arriving():
            uploads = await _uploads(request, settings)
            if len(uploads) != 1:
                raise BadRequest(400, f"POST /explain takes one file, not {len(uploads)}")
            invert = _invert(request)
            picture, inverted = await run_in_threadpool(
                decode_image, uploads[0][1], uploads[0][0], spec, invert, settings.max_pixels
            )
        explanation = await batcher.on_model_thread(lambda: explain_predictor(predictor, picture[None]))
        answer = _file_answer(
            uploads[0][0], explanation.probabilities[0], inverted, predictor, _top(request, len(spec.class_names))
        )
        drawn = await run_in_threadpool(_heatmap_png, picture, explanation.heatmaps[0])
        answer["explained"] = spec.class_names[int(explanation.classes[0])]
        answer["heatmap"] = "data:image/png;base64," + base64.b64encode(drawn).decode()
        return JSONResponse(answer)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    routes = [
        Route("/", endpoint("page", page, page=True), methods=["GET"]),
        Route("/healthz", endpoint("healthz", health, public=True), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics), methods=["GET"]),
        Route("/predict", endpoint("predict", predict_files), methods=["POST"]),
        Route("/explain", endpoint("explain", explain_file), methods=["POST"]),
        Route("/v1/models/{rest:path}", endpoint("v1_status", model_status), methods=["GET"]),
        Route("/v1/models/{rest:path}", endpoint("v1_predict", model_predict), methods=["POST"]),
    ]

    async def not_routed(request: Request, error: Exception) -> Response:
        status = error.status_code if isinstance(error, HTTPException) else 404
        message = "no such route" if status == 404 else f"{request.method} is not allowed here"
        response = _refused(request, status, f"{message}: {request.method} {request.url.path}", False)
        telemetry.answered("unrouted", status, 0.0)
        return response

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_routed, 405: not_routed})


async def _off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    """``work()`` on a worker thread for a large body, inline for a small one: a thread hop per small
    request (a few kilobytes of JSON) cost more than the parsing, in threads fighting for the GIL."""
    if size > _INLINE_BYTES:
        return await run_in_threadpool(work)
    return work()


def _refused(request: Request, status: int, message: str, page: bool) -> Response:
    """``{"error": message}``, logged as one line; a page route's 401 asks the browser for the key."""
    log.warning(f"{status} {request.method} {request.url.path}: {message}")
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": f'{"Basic" if page else "Bearer"} realm="finetune"'}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _authorize(request: Request, api_key: str | None, page: bool) -> None:
    """With a key, ``Authorization: Bearer KEY`` (or Basic with KEY as the password, which a browser asks for)."""
    if api_key is None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    offered = ""
    if scheme.lower() == "bearer":
        offered = credentials.strip()
    elif scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            offered = base64.b64decode(credentials.strip()).decode().partition(":")[2]
    if not hmac.compare_digest(offered.encode(), api_key.encode()):
        raise BadRequest(401, "missing or wrong API key: send Authorization: Bearer KEY")


def _model_path(rest: str, served: str) -> tuple[str, str | None, str | None]:
    """``NAME[/versions/V][/metadata][:VERB]`` split into the name, the version part and the verb."""
    path, _, verb = rest.partition(":")
    parts = path.split("/")
    name, extra = parts[0], parts[1:]
    if name != served:
        raise BadRequest(404, f"Servable not found for request: Latest({name}); this server has {served!r}")
    version: str | None = None
    if extra[:1] == ["versions"]:
        if len(extra) < 2 or extra[1] != _MODEL_VERSION:
            raise BadRequest(404, f"Servable not found: {name} version {extra[1] if len(extra) > 1 else '?'}")
        extra = extra[2:]
    if extra == ["metadata"]:
        version = "metadata"
    elif extra:
        raise BadRequest(404, f"no such route under /v1/models: {rest}")
    return name, version, verb or None


def _metadata(name: str, spec) -> dict:
    """TF Serving's ``GetModelMetadata`` answer, with the class names as ``labels``."""
    dims = [{"size": "-1", "name": ""}] + [{"size": str(size), "name": ""} for size in spec.shape]
    signature = {
        "inputs": {INPUT_NAME: {"dtype": "DT_UINT8", "tensor_shape": {"dim": dims, "unknown_rank": False}}},
        "outputs": {
            "output_0": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {
                    "dim": [{"size": "-1", "name": ""}, {"size": str(len(spec.class_names)), "name": ""}],
                    "unknown_rank": False,
                },
            }
        },
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": _MODEL_VERSION},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
        "labels": list(spec.class_names),
        "resize": spec.resize,
        "background": spec.background,
    }


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its Content-Length) passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body is {int(declared):,} bytes, over the limit of {limit:,} (--max-body)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over the limit of {limit:,} bytes (--max-body)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """The ``file`` fields of a multipart body, as (file name, bytes)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(415, "POST /predict takes multipart/form-data with one or more file fields")
    body = await _read_body(request, settings.max_body)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=settings.max_files, max_fields=settings.max_files)
    except HTTPException as error:  # Starlette's refusal of a malformed or oversized form
        raise BadRequest(400, f"the multipart body cannot be read: {error.detail}") from None
    except Exception as error:  # noqa: BLE001 - the multipart parser's own errors
        raise BadRequest(400, f"the multipart body cannot be read: {first_line(error)}") from None
    uploads: list[tuple[str, bytes]] = []
    for value in form.getlist("file"):
        if isinstance(value, str):
            raise BadRequest(400, "a file field holds text, not a file: send it as a file upload")
        uploads.append((value.filename or f"file {len(uploads) + 1}", await value.read()))
    await form.close()
    if not uploads:
        raise BadRequest(400, "no file field in the form: send each image as file=@IMAGE")
    return uploads


def _invert(request: Request) -> str:
    invert = request.query_params.get("invert", "auto")
    if invert not in _INVERT_CHOICES:
        raise BadRequest(400, f"invert must be one of {', '.join(_INVERT_CHOICES)}, not {invert!r}")
    return invert


def _top(request: Request, classes: int) -> int:
    text = request.query_params.get("top", "5")
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(400, f"top must be a whole number of at least 1, not {text!r}")
    return min(int(text), classes)


def _heatmap_png(picture: np.ndarray, heatmap: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(overlay(picture, heatmap, viewing_scale(picture.shape))).save(buffer, format="PNG")
    return buffer.getvalue()


def _file_answer(name: str, probabilities: np.ndarray, inverted: bool, predictor: Predictor, top: int) -> dict:
    names = predictor.spec.class_names
    order = np.argsort(-probabilities, kind="stable")
    answer: dict = {
        "file": name,
        "top": [{"label": names[i], "probability": float(probabilities[i])} for i in order[:top]],
        "inverted": inverted,
    }
    if predictor.thresholds is not None:
        answer["tags"] = [
            {"label": names[i], "probability": float(probabilities[i])}
            for i in order
            if probabilities[i] >= predictor.thresholds[i]
        ]
    return answer
