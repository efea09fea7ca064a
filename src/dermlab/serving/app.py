"""The web app: ``create_app(predictor)`` builds a FastAPI app serving predictions, Grad-CAM and a web page.

Endpoints: ``POST /predict`` and ``POST /explain`` (multipart field ``file``), ``GET /health``, ``GET /`` (the
page), ``/docs`` and ``/openapi.json``. For a metadata-fusion model ``/predict`` also takes the form fields
``age``, ``sex`` and ``localization`` (each optional; the answer's ``metadata`` says what was used and what was
missing), and the page offers them. When the checkpoint holds an abstention rule, ``/predict`` answers
``"uncertain": true`` with a message ("this image may not be a skin lesion") for images the rule rejects. Uploads are bounded: a Content-Length over the limit is refused before
any byte is read, and a body that grows past it while streaming is cut off (413). Images are decoded by
:func:`dermlab.data.images.open_image_bytes` (EXIF orientation, every colour mode, decompression-bomb limit).
Endpoints are plain ``def`` functions, so inference runs in the threadpool; the predictor's lock serialises
the model calls.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name classes
# imported inside create_app (FastAPI stays an optional dependency), so they must be evaluated in place.

import secrets
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from dermlab import __version__
from dermlab.data.images import DEFAULT_MAX_PIXELS, open_image_bytes
from dermlab.data.metadata import LOCALIZATIONS, SEXES, PatientMetadata, parse_patient_metadata
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.abstention import UNCERTAIN_MESSAGE

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["DISCLAIMER", "DEFAULT_MAX_UPLOAD_BYTES", "SupportsPredict", "create_app"]

DISCLAIMER = "research tool, not a medical device"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
_MULTIPART_OVERHEAD = 64 * 1024  # room for multipart boundaries, part headers and the small `target` field
_PROTECTED_PATHS = frozenset({"/predict", "/explain"})
_PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class SupportsPredict(Protocol):
    """What the app needs of a predictor (:class:`dermlab.serving.predictor.Predictor` provides it)."""

    classes: list[str]
    model_id: str

    def predict_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def explain(self, image: Image.Image, target: str | int | None = None) -> bytes: ...


def create_app(
    predictor: SupportsPredict,
    *,
    api_token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> "FastAPI":
    """The FastAPI app around ``predictor``.

    ``api_token``: when set, ``/predict`` and ``/explain`` need ``Authorization: Bearer <token>`` (401 otherwise).
    ``max_upload_bytes``: larger uploads get 413. ``max_pixels``: larger images are refused as decompression bombs.
    """
    from fastapi import Depends, FastAPI, File, Form, UploadFile
    from fastapi.responses import HTMLResponse, Response

    if max_upload_bytes < 1:
        raise ConfigError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    token = api_token or None
    takes_metadata = bool(getattr(predictor, "takes_metadata", False))
    app = FastAPI(
        title="dermlab",
        version=__version__,
        description=f"Skin-lesion image classifier `{predictor.model_id}`. **{DISCLAIMER.capitalize()}.**",
    )
    app.add_middleware(_UploadGuard, max_body_bytes=max_upload_bytes + _MULTIPART_OVERHEAD, api_token=token)
    require_token = _token_dependency(token)

    def read_upload(file: UploadFile) -> Image.Image:
        return _upload_image(file, max_upload_bytes, max_pixels)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers=_PAGE_SECURITY_HEADERS)

    @app.get("/health", summary="liveness, model id and classes")
    def health() -> dict[str, Any]:
        return _health_answer(predictor, takes_metadata)

    @app.post("/predict", summary="class probabilities of one image", dependencies=[Depends(require_token)])
    def predict(
        file: UploadFile = File(..., description="an image (JPEG, PNG, TIFF, BMP, WebP, GIF)"),
        age: str | None = Form(None, description="metadata-fusion models: the patient's age in years; empty = unknown"),
        sex: str | None = Form(None, description=f"metadata-fusion models: one of {list(SEXES)}; empty = unknown"),
        localization: str | None = Form(
            None, description=f"metadata-fusion models: the body site, one of {list(LOCALIZATIONS)}; empty = unknown"
        ),
    ) -> dict[str, Any]:
        record = _metadata_record(predictor, takes_metadata, age, sex, localization)
        return _prediction_answer(predictor, read_upload(file), record, takes_metadata)

    @app.post(
        "/explain",
        summary="Grad-CAM overlay (PNG) for the predicted class or `target`",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the overlay"}},
        dependencies=[Depends(require_token)],
    )
    def explain(
        file: UploadFile = File(..., description="an image"),
        target: str | None = Form(
            None, description=f"class to explain (default: the predicted one); one of {predictor.classes}"
        ),
    ) -> Response:
        target = _explainable_target(predictor, target)
        png = _explanation_png(predictor, read_upload(file), target)
        return Response(content=png, media_type="image/png", headers={"X-Disclaimer": DISCLAIMER})

    return app


def _token_dependency(token: str | None) -> Callable[..., None]:
    """A FastAPI dependency refusing (401) a request without ``Authorization: Bearer <token>``; None: open."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="the server's API token (only when it was started with one)")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not _token_matches(credentials.credentials, token):
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _explainable_target(predictor: SupportsPredict, target: str | None) -> str | None:
    """The class ``/explain`` is asked for (None: the predicted one); 422 for an unknown class, 501 on ONNX."""
    from fastapi import HTTPException

    target = target or None
    if target is not None and target not in predictor.classes:
        raise HTTPException(422, f"unknown class {target!r}; valid classes: {', '.join(predictor.classes)}")
    if not getattr(predictor, "can_explain", True):
        raise HTTPException(501, "Grad-CAM needs the torch engine; this server runs an ONNX export")
    return target


def _explanation_png(predictor: SupportsPredict, image: Image.Image, target: str | None) -> bytes:
    from fastapi import HTTPException

    try:
        return predictor.explain(image, target=target)
    except ConfigError as error:
        raise HTTPException(422, str(error)) from None


def _upload_image(file: Any, max_upload_bytes: int, max_pixels: int | None) -> Image.Image:
    """The uploaded image, or an HTTP error: 413 above ``max_upload_bytes``, else ``_status_for`` a bad file."""
    from fastapi import HTTPException

    # Starlette has already spooled the part (bounded by _UploadGuard); never read more than the limit + 1.
    data = file.file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"upload too large: more than {max_upload_bytes} bytes")
    try:
        return open_image_bytes(data, name=file.filename or "upload", max_pixels=max_pixels)
    except DataError as error:
        raise HTTPException(_status_for(error), str(error)) from None


def _health_answer(predictor: Any, takes_metadata: bool) -> dict[str, Any]:
    """``/health``: liveness, the model, its classes and how it predicts."""
    return {
        "status": "ok",
        "model_id": predictor.model_id,
        "classes": list(predictor.classes),
        "engine": getattr(predictor, "engine", "torch"),
        "temperature": getattr(predictor, "temperature", None),
        "tta_views": list(getattr(predictor, "tta_views", ("identity",))),
        "abstention": getattr(predictor, "abstention", None) is not None,
        "metadata_fusion": takes_metadata,
        "metadata_fields": {"age": "years, 0-120", "sex": list(SEXES), "localization": list(LOCALIZATIONS)}
        if takes_metadata
        else None,
        "disclaimer": DISCLAIMER,
    }


def _metadata_record(
    predictor: Any, takes_metadata: bool, age: str | None, sex: str | None, localization: str | None
) -> PatientMetadata | None:
    """The form's metadata for a fusion model (422 when invalid); 422 when a model without fusion is sent some."""
    from fastapi import HTTPException

    given = any(value is not None and value.strip() for value in (age, sex, localization))
    if not takes_metadata:
        if given:
            raise HTTPException(
                422, f"model {predictor.model_id} does not take metadata (age, sex, localization); send the image alone"
            )
        return None
    try:
        return parse_patient_metadata(age, sex, localization, where="form field")
    except DataError as error:
        raise HTTPException(422, str(error)) from None


def _prediction_answer(predictor: Any, image: Image.Image, record: PatientMetadata | None, takes_metadata: bool) -> dict[str, Any]:
    """``/predict``'s answer: probabilities, the class of each decision rule, abstention and the disclaimer."""
    abstaining = getattr(predictor, "predict_with_abstention", None)
    rows = [record] if takes_metadata else None
    distance = look = None
    if abstaining is not None:
        result = abstaining([image], rows) if rows is not None else abstaining([image])
        probabilities, uncertain, reasons = result.probabilities[0], bool(result.uncertain[0]), result.reasons[0]
        if getattr(result, "feature_distance", None) is not None:
            distance = float(result.feature_distance[0])
        if getattr(result, "level_score", None) is not None:
            look = float(result.level_score[0])
    else:  # a predictor without abstention support
        probabilities, uncertain, reasons = predictor.predict_images([image])[0], False, []
    by_rule = _classes_by_rule(predictor, probabilities)
    rule = getattr(predictor, "decision_rule", "argmax")
    top = predictor.classes.index(by_rule[rule])
    return {
        "probabilities": {name: float(p) for name, p in zip(predictor.classes, probabilities)},
        "top_class": predictor.classes[top],
        "top_probability": float(probabilities[top]),
        "decision_rule": rule,
        "class_by_rule": by_rule,
        "uncertain": uncertain,
        "message": UNCERTAIN_MESSAGE if uncertain else None,
        "uncertain_reasons": reasons,
        "feature_distance": distance,  # to the training images' features (typical: about 1); None without statistics
        "level_score": look,  # how unlike the training images it looks (about 0 at home); None without level statistics
        "metadata": _metadata_answer(record) if takes_metadata else None,
        "model_id": predictor.model_id,
        "disclaimer": DISCLAIMER,
    }


def _classes_by_rule(predictor: Any, probabilities: np.ndarray) -> dict[str, str]:
    """The class each decision rule of the run picks (``argmax``, and ``balanced`` when the run has one)."""
    by_rule = getattr(predictor, "classes_by_rule", None)
    if by_rule is None:  # a predictor without decision rules
        return {"argmax": predictor.classes[int(np.argmax(probabilities))]}
    return {rule: picked[0] for rule, picked in by_rule(probabilities).items()}


def _metadata_answer(record: PatientMetadata | None) -> dict[str, Any]:
    """What a fusion model was given: ``status`` (used / partial / missing), the missing fields and a note."""
    record = record or PatientMetadata()
    missing = list(record.missing)
    note = None
    if missing:
        note = f"predicted without {', '.join(missing)}: the model was trained with age, sex and localization"
    return {
        "status": record.status,
        "missing": missing,
        "values": {"age": record.age, "sex": record.sex, "localization": record.localization},
        "note": note,
    }


def _token_matches(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _status_for(error: DataError) -> int:
    """415 for data that is not an image, 413 for decompression bombs, 422 for empty, corrupt or truncated files."""
    message = str(error)
    if "not an image file" in message:
        return 415
    if "too large" in message or "decompression bomb" in message:
        return 413
    return 422


def _page_html() -> str:
    return resources.files("dermlab.serving").joinpath("static/index.html").read_text(encoding="utf-8")


class _UploadGuard:
    """ASGI middleware on ``/predict`` and ``/explain``: token first, then a bounded request body.

    A request whose Content-Length is over the limit (or whose token is wrong) is answered before its body is
    read; a body without a length (chunked) is counted as it streams and cut off once it passes the limit.
    """

    def __init__(self, app: Any, max_body_bytes: int, api_token: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_token = api_token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in _PROTECTED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        if self.api_token is not None and not self._authorized(headers.get("authorization", "")):
            await _send_json(send, 401, "missing or wrong API token", {"www-authenticate": "Bearer"})
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if int(length) > self.max_body_bytes:
                await _send_json(send, 413, self._too_large())
                return
        from starlette.exceptions import HTTPException

        received = 0
        started = exceeded = False

        async def bounded_receive() -> dict:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise HTTPException(413, self._too_large())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except HTTPException as error:
            # FastAPI re-raises HTTPExceptions from body parsing; normally its handler answers them already.
            if started or not exceeded:
                raise
            await _send_json(send, 413, str(error.detail))

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and _token_matches(credentials.strip(), self.api_token or "")

    def _too_large(self) -> str:
        limit = self.max_body_bytes - _MULTIPART_OVERHEAD
        return f"upload too large: the limit is {limit} bytes ({limit / 1024 / 1024:.1f} MiB)"


async def _send_json(send: Any, status: int, detail: str, extra_headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.encode("latin-1"), value.encode("latin-1")) for key, value in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
