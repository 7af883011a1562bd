"""`finetune serve`: a real server process on a free 127.0.0.1 port, answering as the model does, refusing bad
input with a 4xx JSON line and serving the next request, merging concurrent requests into batches."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.data.input_spec import describe_input, write_input_spec

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret-key"
MAX_BODY = 300_000

MLP_RECIPE = {
    "name": "mlp",
    "seed": 0,
    "precision": "float32",
    "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.0, "train_limit": 300},
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32]}}, "head": {}},
    "training": {"batch_size": 32, "verbose": 0},
    "phases": [
        {"name": "train", "epochs": 2, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 3e-3}}
    ],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder like a run's (model.keras, input.json, recipe.yaml), the model, and 32 test images."""
    from finetune import data

    recipe = finetune.load_recipe(MLP_RECIPE)
    dataset = data.load_dataset(recipe.data, recipe.seed)
    keras.utils.set_random_seed(0)
    model = finetune.build_model(recipe)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(dataset.train.images, dataset.train.labels, epochs=2, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("served")
    model.save(folder / "model.keras")
    write_input_spec(folder, describe_input(dataset.train.images, dataset.class_names, "crop"))
    (folder / "recipe.yaml").write_text("name: fmnist-mlp\n")
    return folder, model, dataset.test.images[:32], dataset.class_names


class Server:
    """``python -m finetune serve`` in a subprocess; ``call`` answers (status, JSON or text, headers)."""

    def __init__(self, folder: Path, *options: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune", "serve", str(folder), "--port", "0", *options],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError(f"the server stopped: {''.join(self.lines[-5:])}")
            self.lines.append(line)
            found = re.search(r"serving \S+ .* at (http://127\.0\.0\.1:\d+)/", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start in 120 s")
        # Later lines (one per refused request) are read in the background, so the pipe never fills.
        self._reader = ThreadPoolExecutor(1)
        self._reader.submit(lambda: self.lines.extend(self.process.stderr))

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, key=KEY):
        headers = dict(headers or {})
        if key is not None:
            headers.setdefault("Authorization", f"Bearer {key}")
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw, answer_headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, raw, answer_headers = error.code, error.read(), error.headers
        kind = answer_headers.get("content-type", "")
        return status, (json.loads(raw) if kind.startswith("application/json") else raw.decode()), answer_headers

    def predict(self, document: dict, name: str = "fmnist-mlp", **options):
        return self.call("POST", f"/v1/models/{name}:predict", json.dumps(document).encode(), **options)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._reader.shutdown(wait=False)


@pytest.fixture(scope="module")
def server(trained):
    running = Server(trained[0], "--max-body", str(MAX_BODY), "--max-delay-ms", "20", env={"FINETUNE_API_KEY": KEY})
    yield running
    running.stop()


def reference(model, images) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(np.asarray(images), training=False))


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0], "L").save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_rest_predictions_equal_the_models_own(server, trained):
    _, model, images, _ = trained
    status, answer, _ = server.predict({"instances": images[:16].tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(answer["predictions"]), reference(model, images[:16]), atol=1e-5)
    # Columnar, with the input named, is answered under "outputs", as TF Serving answers it.
    status, answer, _ = server.predict({"inputs": {"images": images[16:20].tolist()}})
    assert status == 200
    np.testing.assert_allclose(np.array(answer["outputs"]), reference(model, images[16:20]), atol=1e-5)


def test_b64_image_files_and_nested_lists_give_the_same_answer(server, trained):
    _, _, images, _ = trained
    nested = server.predict({"instances": images[:8].tolist()})[1]["predictions"]
    encoded = [{"b64": base64.b64encode(png(image)).decode()} for image in images[:8]]
    status, answer, _ = server.predict({"instances": encoded})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], nested, atol=1e-6)


def test_uploaded_files_are_answered_as_finetune_predict_answers_them(server, trained, tmp_path):
    folder, _, images, class_names = trained
    paths = []
    for position, image in enumerate(images[:3]):
        path = tmp_path / f"{position}.png"
        path.write_bytes(png(255 - image))  # dark on light: inverted back, as predict does
        paths.append(path)
    body, headers = multipart([(path.name, path.read_bytes()) for path in paths])
    status, answer, _ = server.call("POST", "/predict?top=3", body, headers)
    assert status == 200
    expected = finetune.predict(folder, paths, top=3)
    assert [entry["file"] for entry in answer["predictions"]] == [path.name for path in paths]
    for served, local in zip(answer["predictions"], expected, strict=True):
        assert served["inverted"] is True and local.inverted is True
        assert [item["label"] for item in served["top"]] == [name for _, name, _ in local.top]
        np.testing.assert_allclose([item["probability"] for item in served["top"]], [p for *_, p in local.top], 1e-5)
    assert {item["label"] for entry in answer["predictions"] for item in entry["top"]} <= set(class_names)


def test_status_and_metadata_answer_in_tensorflow_servings_form(server, trained):
    _, _, images, class_names = trained
    status, answer, _ = server.call("GET", "/v1/models/fmnist-mlp")
    assert status == 200
    assert answer["model_version_status"][0]["state"] == "AVAILABLE"
    status, answer, _ = server.call("GET", "/v1/models/fmnist-mlp/versions/1/metadata")
    assert status == 200
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    dims = [int(dim["size"]) for dim in signature["inputs"]["images"]["tensor_shape"]["dim"]]
    assert dims == [-1, *images.shape[1:]]
    assert signature["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert answer["labels"] == list(class_names)


def _truncated_png(image: np.ndarray) -> bytes:
    data = png(image)
    return data[: len(data) // 2]


def _bomb() -> bytes:
    """A 12,000 x 12,000 one-bit PNG: 144 million pixels in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "a text file uploaded": ("POST", "/predict", lambda images: multipart([("notes.txt", b"not an image")]), 400),
    "a truncated PNG": ("POST", "/predict", lambda images: multipart([("cut.png", _truncated_png(images[0]))]), 400),
    "a decompression bomb": ("POST", "/predict", lambda images: multipart([("bomb.png", _bomb())]), 400),
    "a body over --max-body": ("POST", "/predict", lambda images: multipart([("big.png", b"0" * MAX_BODY)]), 413),
    "no file field": ("POST", "/predict", lambda images: multipart([("a.png", png(images[0]))], "photo"), 400),
    "JSON sent to /predict": ("POST", "/predict", lambda images: (b"{}", {"Content-Type": "application/json"}), 415),
    "an instance of the wrong shape": (
        "POST",
        "/v1/models/fmnist-mlp:predict",
        lambda images: (json.dumps({"instances": [images[0][:20].tolist()]}).encode(), {}),
        400,
    ),
    "an instance of floats": (
        "POST",
        "/v1/models/fmnist-mlp:predict",
        lambda images: (json.dumps({"instances": [(images[0] / 255).tolist()]}).encode(), {}),
        400,
    ),
    "values over 255": (
        "POST",
        "/v1/models/fmnist-mlp:predict",
        lambda images: (json.dumps({"instances": [(images[0].astype(int) + 300).tolist()]}).encode(), {}),
        400,
    ),
    "a ragged instance": (
        "POST",
        "/v1/models/fmnist-mlp:predict",
        lambda images: (json.dumps({"instances": [[[1, 2], [3]]]}).encode(), {}),
        400,
    ),
    "broken JSON": ("POST", "/v1/models/fmnist-mlp:predict", lambda images: (b'{"instances": [', {}), 400),
    "no instances": ("POST", "/v1/models/fmnist-mlp:predict", lambda images: (b'{"instance": []}', {}), 400),
    "bad base64": (
        "POST",
        "/v1/models/fmnist-mlp:predict",
        lambda images: (b'{"instances": [{"b64": "%%%"}]}', {}),
        400,
    ),
    "an unknown model name": ("POST", "/v1/models/other:predict", lambda images: (b'{"instances": []}', {}), 404),
    "an unknown route": ("GET", "/v2/anything", lambda images: (None, {}), 404),
    "a heatmap of a model without a spatial backbone": (
        "POST",
        "/explain",
        lambda images: multipart([("a.png", png(images[0]))]),
        404,
    ),
    "a method a route does not take": ("DELETE", "/predict", lambda images: (None, {}), 405),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_json_line_and_the_next_request_is_served(server, trained, case):
    _, model, images, _ = trained
    method, path, make, expected = BAD_REQUESTS[case]
    body, headers = make(images)
    status, answer, _ = server.call(method, path, body, headers)
    assert status == expected
    assert isinstance(answer, dict) and set(answer) == {"error"}
    assert answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    status, answer, _ = server.predict({"instances": images[:2].tolist()})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], reference(model, images[:2]), atol=1e-5)
    assert server.process.poll() is None


def test_the_api_key_guards_every_route_but_healthz(server, trained):
    _, _, images, _ = trained
    body = json.dumps({"instances": images[:1].tolist()}).encode()
    assert server.call("POST", "/v1/models/fmnist-mlp:predict", body, key=None)[0] == 401
    assert server.call("POST", "/v1/models/fmnist-mlp:predict", body, key="wrong")[0] == 401
    assert server.call("GET", "/metrics", key=None)[0] == 401
    status, _, headers = server.call("GET", "/", key=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")  # the browser asks for the key
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert server.call("GET", "/", headers={"Authorization": f"Basic {basic}"}, key=None)[0] == 200
    assert server.call("POST", "/v1/models/fmnist-mlp:predict", body)[0] == 200
    assert server.call("GET", "/healthz", key=None)[0] == 200


def _batch_counts(metrics: str) -> tuple[float, float]:
    """(model calls, model calls of one image) from the batch-size histogram."""
    total = float(re.search(r"^finetune_batch_size_count (\S+)$", metrics, re.M).group(1))
    single = float(re.search(r'^finetune_batch_size_bucket\{le="1\.0"\} (\S+)$', metrics, re.M).group(1))
    return total, single


def test_concurrent_requests_are_merged_into_batches(server, trained):
    _, model, images, _ = trained
    before = _batch_counts(server.call("GET", "/metrics")[1])

    def one(position: int):
        return server.predict({"instances": images[position % 32 : position % 32 + 1].tolist()})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(96)))
    assert all(status == 200 for status, _, _ in answers)
    for position, (_, answer, _) in enumerate(answers):  # each answer is its own image's, whatever it was batched with
        row = position % 32
        np.testing.assert_allclose(answer["predictions"], reference(model, images[row : row + 1]), atol=1e-5)
    total, single = _batch_counts(server.call("GET", "/metrics")[1])
    calls, merged = total - before[0], (total - single) - (before[0] - before[1])
    assert calls < 96 and merged > 0


def test_metrics_count_requests_errors_and_latency(server, trained):
    assert server.predict({"instances": trained[2][:1].tolist()})[0] == 200
    server.call("GET", "/v2/missing")
    metrics = server.call("GET", "/metrics")[1]
    assert re.search(r'^finetune_requests_total\{code="200",route="v1_predict"\} [1-9]', metrics, re.M)
    assert re.search(r'^finetune_request_errors_total\{route="unrouted"\} [1-9]', metrics, re.M)
    assert re.search(r'^finetune_request_seconds_count\{route="v1_predict"\} [1-9]', metrics, re.M)
    # What was loaded before listening (TensorFlow, Keras, the model) is out of the collector's sight:
    # a full collection over it stalled every request in flight.
    frozen = float(re.search(r"^finetune_gc_frozen_objects (\S+)$", metrics, re.M).group(1))
    assert frozen > 100_000


def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2_before_a_port_opens(tmp_path):
    from tests.conftest import cli_in_process

    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a zip file")
    for target in (broken, tmp_path / "missing"):
        result = cli_in_process("serve", str(target), "--port", "0")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and str(target) in result.stderr


def test_a_port_in_use_is_one_line_and_exit_2(trained):
    from tests.conftest import cli_in_process

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli_in_process("serve", str(trained[0]), "--port", str(port))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.fixture(scope="module")
def conv_server(tmp_path_factory):
    """A server of a model with a nested conv backbone (MobileNetV2, untrained): it has heatmaps."""
    import copy

    from tests.conftest import TINY_RECIPE

    recipe = copy.deepcopy(TINY_RECIPE)
    keras.utils.set_random_seed(0)
    model = finetune.build_model(finetune.load_recipe(recipe), input_shape=(28, 28, 1), num_classes=3)
    folder = tmp_path_factory.mktemp("conv")
    model.save(folder / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    write_input_spec(folder, describe_input(images, ("cat", "dog", "owl"), "crop"))
    running = Server(folder, "--model-name", "conv")
    yield running, model, images
    running.stop()


def test_explain_answers_the_top_classes_and_a_heatmap_picture(conv_server):
    from finetune.inference.explain import explain

    running, model, images = conv_server
    body, headers = multipart([("photo.png", png(images[0]))])
    status, answer, _ = running.call("POST", "/explain?top=2", body, headers, key=None)
    assert status == 200
    expected = explain(model, images[:1])
    names = ["cat", "dog", "owl"]
    assert answer["explained"] == names[int(expected.classes[0])] == answer["top"][0]["label"]
    np.testing.assert_allclose(answer["top"][0]["probability"], expected.probabilities[0].max(), atol=1e-5)
    prefix = "data:image/png;base64,"
    assert answer["heatmap"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(answer["heatmap"][len(prefix) :]))) as drawn:
        assert drawn.size == (224, 224)
    body, headers = multipart([("a.png", png(images[0])), ("b.png", png(images[1]))])
    assert running.call("POST", "/explain", body, headers, key=None)[0] == 400  # one file at a time


# --- the batcher itself --------------------------------------------------------------------------------------


def test_the_batcher_merges_what_arrives_within_the_delay_and_splits_the_answers():
    from finetune.serving.batching import DynamicBatcher

    calls: list[int] = []

    def doubled(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return images * 2.0

    async def scenario():
        batcher = DynamicBatcher(doubled, max_batch=8, max_delay=0.05)
        await batcher.start()
        try:
            inputs = [np.full((size, 1), position, np.float32) for position, size in enumerate([1, 2, 3, 6])]
            answers = await asyncio.gather(*(batcher.predict(images) for images in inputs))
        finally:
            await batcher.stop()
        return inputs, answers

    inputs, answers = asyncio.run(scenario())
    for images, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer, images * 2)
    assert calls == [6, 6]  # 1+2+3 merged; the 6 would pass max_batch, so it leads the next call


def test_a_failing_model_call_fails_its_requests_and_the_batcher_goes_on():
    from finetune.serving.batching import DynamicBatcher

    def fragile(images: np.ndarray) -> np.ndarray:
        if (images < 0).any():
            raise ValueError("negative pixels")
        return images

    async def scenario():
        batcher = DynamicBatcher(fragile, max_batch=4, max_delay=0.0)
        await batcher.start()
        try:
            with pytest.raises(ValueError, match="negative"):
                await batcher.predict(-np.ones((1, 1)))
            return await batcher.predict(np.ones((2, 1)))
        finally:
            await batcher.stop()

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((2, 1)))


# --- the page, in a real browser ------------------------------------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium and chromium-driver are not installed")
def test_the_page_uploads_an_image_and_shows_the_models_top_class_and_heatmap(conv_server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running, model, images = conv_server
    path = tmp_path / "photo.png"
    path.write_bytes(png(images[2]))
    expected = ("cat", "dog", "owl")[int(np.argmax(reference(model, images[2:3])[0]))]
    browser, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    page = webdriver.Chrome(service=Service(driver), options=options)
    try:
        page.get(running.url + "/")
        page.find_element(By.ID, "files").send_keys(str(path))
        done = WebDriverWait(page, 60).until(lambda p: p.find_elements(By.CSS_SELECTOR, ".result.done, .result.failed"))
        assert "done" in done[0].get_attribute("class"), done[0].text
        labels = [element.text for element in done[0].find_elements(By.CSS_SELECTOR, ".bar .label")]
        assert labels[0] == expected
        assert done[0].get_attribute("data-top") == expected
        heatmap = done[0].find_element(By.CSS_SELECTOR, "img.heatmap")
        assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
        assert page.execute_script("return arguments[0].naturalWidth", heatmap) == 224  # the picture decoded
    finally:
        page.quit()


def test_a_lone_request_does_not_wait_out_the_delay():
    from finetune.serving.batching import DynamicBatcher

    async def scenario():
        batcher = DynamicBatcher(lambda images: images, max_batch=8, max_delay=600.0)
        await batcher.start()
        try:  # with nothing else on its way, the batch goes at once: 10 s is far inside the 600 s delay
            return await asyncio.wait_for(batcher.predict(np.ones((1, 1))), timeout=10)
        finally:
            await batcher.stop()

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((1, 1)))


def test_a_request_on_its_way_is_waited_for_and_joins_the_batch():
    from finetune.serving.batching import DynamicBatcher

    calls: list[int] = []

    def counted(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return images

    async def scenario():
        batcher = DynamicBatcher(counted, max_batch=8, max_delay=600.0)
        await batcher.start()
        try:
            with batcher.arriving():  # a second request is still reading its body
                first = asyncio.ensure_future(batcher.predict(np.zeros((1, 1))))
                await asyncio.sleep(0.2)
                assert not first.done()
                second = asyncio.ensure_future(batcher.predict(np.ones((2, 1))))
            return await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
        finally:
            await batcher.stop()

    first, second = asyncio.run(scenario())
    assert calls == [3]
    np.testing.assert_array_equal(first, np.zeros((1, 1)))
    np.testing.assert_array_equal(second, np.ones((2, 1)))


def test_the_servers_connections_send_without_nagles_delay():
    """asyncio turns Nagle's algorithm off only on sockets made with IPPROTO_TCP; with it on, every answer
    waited ~40 ms for the client's delayed ACK."""
    from finetune.serving.server import bind

    async def scenario() -> int:
        listener = bind("127.0.0.1", 0)
        seen: list[int] = []

        async def accepted(reader, writer):
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            writer.close()
        return seen[0]

    assert asyncio.run(scenario()) != 0
