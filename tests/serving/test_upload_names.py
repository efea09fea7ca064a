"""An upload with a hostile file name gets a 4xx whose detail is one printable line naming it safely."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from dermlab.serving.app import create_app  # noqa: E402


@pytest.mark.parametrize("name", ["x\ny.jpg", "esc\x1b[2J.png", "cr\rlf.webp"])
def test_a_hostile_upload_name_is_quoted_in_the_error(predictor, name: str) -> None:
    client = TestClient(create_app(predictor))
    response = client.post("/predict", files={"file": (name, io.BytesIO(b"not an image"), "image/jpeg")})
    assert 400 <= response.status_code < 500, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.isprintable(), repr(detail)
    # httpx percent-encodes a newline in the multipart header; an escape character arrives raw and is escaped
    assert repr(name)[1:-1] in detail or name.replace("\n", "%0A").replace("\r", "%0D") in detail
