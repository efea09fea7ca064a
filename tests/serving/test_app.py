"""create_app with FastAPI's TestClient against a real tiny model: responses, bad uploads, token, concurrency."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from dermlab.serving.app import DISCLAIMER, create_app  # noqa: E402

JPEG = "image/jpeg"
PNG = "image/png"


class RecordingPredictor:
    """Delegates to the real predictor and records the size of every image it is given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.classes = inner.classes
        self.model_id = inner.model_id
        self.engine = inner.engine
        self.sizes: list[tuple[int, int]] = []
        self.modes: list[str] = []

    def predict_images(self, images):
        self.sizes += [image.size for image in images]
        self.modes += [image.mode for image in images]
        return self.inner.predict_images(images)

    def explain(self, image, target=None):
        return self.inner.explain(image, target=target)


@pytest.fixture
def recorder(predictor) -> RecordingPredictor:
    return RecordingPredictor(predictor)


@pytest.fixture
def client(recorder) -> TestClient:
    return TestClient(create_app(recorder))


def _post(client: TestClient, data: bytes, content_type: str = PNG, name: str = "x.png", path: str = "/predict", **kw):
    return client.post(path, files={"file": (name, data, content_type)}, **kw)


def test_predict_returns_probabilities_summing_to_one(client, images, predictor):
    response = _post(client, images.encode(images.sample()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"probabilities", "top_class", "top_probability", "model_id", "disclaimer"}
    assert list(body["probabilities"]) == predictor.classes
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["top_class"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["top_probability"] == pytest.approx(max(body["probabilities"].values()))
    assert body["model_id"] == predictor.model_id
    assert body["disclaimer"] == DISCLAIMER == "research tool, not a medical device"


def test_predict_matches_the_predictor(client, images, predictor):
    image = images.sample(seed=3)
    body = _post(client, images.encode(image)).json()
    expected = predictor.predict_images([image])[0]
    assert np.allclose(list(body["probabilities"].values()), expected, atol=1e-6)


def test_health_and_openapi_and_docs(client, predictor):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["model_id"] == predictor.model_id
    assert health.json()["classes"] == predictor.classes
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    assert {"/predict", "/explain", "/health"} <= set(schema.json()["paths"])
    assert client.get("/docs").status_code == 200


def test_page_is_served_with_the_disclaimer(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="top-class"' in response.text
    assert "research tool, not a medical device" in response.text
    assert "http://" not in response.text and "https://" not in response.text  # no CDN, nothing external


def test_explain_returns_a_png_overlay(client, images):
    image = images.sample((60, 40))
    response = _post(client, images.encode(image), path="/explain")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == PNG
    overlay = Image.open(__import__("io").BytesIO(response.content))
    assert overlay.format == "PNG" and overlay.size == (60, 40)


def test_explain_with_a_target_class(client, images):
    response = client.post(
        "/explain", files={"file": ("x.png", images.encode(images.sample()), PNG)}, data={"target": "mel"}
    )
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")


def test_explain_unknown_target_names_the_valid_classes(client, images):
    response = client.post(
        "/explain", files={"file": ("x.png", images.encode(images.sample()), PNG)}, data={"target": "melanoma"}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "melanoma" in detail and all(name in detail for name in ("nv", "mel", "bkl"))


# --------------------------------------------------------------------------------------------- bad uploads


def test_upload_over_the_limit_is_refused_before_reading(recorder, images):
    client = TestClient(create_app(recorder, max_upload_bytes=2_000))
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    data = images.encode(Image.fromarray(noise), "PNG")
    assert len(data) > 100_000  # past the limit and its multipart allowance: refused from Content-Length
    response = _post(client, data)
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]
    assert recorder.sizes == []


def test_upload_slightly_over_the_limit_is_refused(recorder, images):
    data = images.encode(images.sample((64, 64)), "PNG")
    client = TestClient(create_app(recorder, max_upload_bytes=len(data) - 1))
    assert _post(client, data).status_code == 413
    exact = TestClient(create_app(recorder, max_upload_bytes=len(data)))
    assert _post(exact, data).status_code == 200


def test_chunked_upload_without_length_is_cut_off(recorder):
    """A body with no Content-Length is counted as it streams (raw ASGI: TestClient buffers bodies first)."""
    app = create_app(recorder, max_upload_bytes=1_000)
    boundary = "dermlabboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunks = [head] + [b"\0" * 65536] * 200  # 12.5 MiB if nobody stopped reading
    received: list[bytes] = []
    sent: list[dict] = []

    async def receive() -> dict:
        if len(received) < len(chunks):
            received.append(chunks[len(received)])
            return {"type": "http.request", "body": received[-1], "more_body": True}
        return {"type": "http.request", "body": f"\r\n--{boundary}--\r\n".encode(), "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert len(received) < 5
    assert recorder.sizes == []


def test_empty_file_is_refused(client):
    response = _post(client, b"")
    assert response.status_code == 422
    assert "empty" in response.json()["detail"]


def test_text_file_is_not_an_image(client):
    response = _post(client, b"hello, this is not an image\n" * 10, "text/plain", "notes.txt")
    assert response.status_code == 415
    assert "notes.txt" in response.json()["detail"] and "not an image" in response.json()["detail"]


def test_truncated_jpeg_is_corrupt(client, images):
    data = images.encode(images.sample((64, 64)), "JPEG", quality=95)
    response = _post(client, data[: len(data) // 2], JPEG, "cut.jpg")
    assert response.status_code == 422
    assert "cut.jpg" in response.json()["detail"]


def test_decompression_bomb_header_is_refused(client, images):
    bomb = images.png_header_only(50_000, 50_000)
    assert len(bomb) < 200
    response = _post(client, bomb, PNG, "bomb.png")
    assert response.status_code == 413
    assert "decompression bomb" in response.json()["detail"]


def test_max_pixels_limit_of_the_app(recorder, images):
    client = TestClient(create_app(recorder, max_pixels=1_000))
    response = _post(client, images.encode(images.sample((40, 40))))
    assert response.status_code == 413
    assert "1600" in response.json()["detail"] and "1000" in response.json()["detail"]


# --------------------------------------------------------------------------------------------- image modes


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG")],
)
def test_image_modes_are_converted_to_rgb(client, recorder, images, mode, fmt):
    base = images.sample((40, 30))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = base.convert(mode)
    data = images.encode(image, fmt)
    assert Image.open(__import__("io").BytesIO(data)).mode in {mode, "I;16", "I"}
    response = _post(client, data, f"image/{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert recorder.modes == ["RGB"] and recorder.sizes == [(40, 30)]


def test_exif_orientation_is_applied(client, recorder, images):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = images.encode(images.sample((40, 20)), "JPEG", exif=exif)
    response = _post(client, data, JPEG, "phone.jpg")
    assert response.status_code == 200
    assert recorder.sizes == [(20, 40)]


# --------------------------------------------------------------------------------------------- token


def test_token_is_required_on_predict_and_explain(recorder, images):
    client = TestClient(create_app(recorder, api_token="s3cret"))
    data = images.encode(images.sample())
    for path in ("/predict", "/explain"):
        assert _post(client, data, path=path).status_code == 401
        wrong = _post(client, data, path=path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert _post(client, data, path=path, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert _post(client, data, path=path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200


def test_wrong_token_is_refused_before_the_body_is_read(recorder):
    client = TestClient(create_app(recorder, api_token="s3cret", max_upload_bytes=1_000))
    response = _post(client, b"\0" * 500_000, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401  # not 413: nothing about the upload is looked at first


# --------------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_all_succeed(recorder, images):
    client = TestClient(create_app(recorder))
    payloads = [images.encode(images.sample((32 + i, 32), seed=i)) for i in range(16)]
    barrier = threading.Barrier(4)

    def call(index: int) -> int:
        if index < 4:
            barrier.wait(timeout=10)
        path = "/explain" if index % 4 == 3 else "/predict"
        return _post(client, payloads[index], path=path).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(call, range(16)))
    assert statuses == [200] * 16
    assert len(recorder.sizes) == 12
