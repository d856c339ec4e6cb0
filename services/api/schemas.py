"""The answers' shapes, for the OpenAPI document: what ``/predict``, ``/feedback``, the probes and every refusal
really return (the routes render with orjson; a test validates live answers against these schemas).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PREDICTION_ID = "0f8e1c2a9b7d4e6f8a1b2c3d4e5f6a7b"


class ModelRef(BaseModel):
    name: str = Field(description="The registered model's name.")
    version: str = Field(description="The registered version that answered.")


class Explanation(BaseModel):
    """Where the model looked: the class activation map of the answer (``/predict?explain=true``)."""

    model_config = ConfigDict(populate_by_name=True)

    for_: str = Field(alias="for", description="The label the map argues for (the answer's).")
    grid: list[int] = Field(description="Rows and columns of the map (the backbone's last feature map), e.g. [9, 9].")
    evidence: list[list[float]] = Field(
        description="Per cell, in logit units: positive cells argued for the answer, negative ones against it."
    )
    png: str = Field(
        description="A `data:image/png;base64,` URL of the map at its grid size: orange, opaque where the evidence "
        "was strongest, transparent elsewhere; stretch it over the whole photo (the model saw it squeezed to a square)."
    )


class Prediction(BaseModel):
    """One photo's answer."""

    id: str = Field(description="The prediction's id (32 hexadecimal characters), for `POST /feedback`.")
    label: str = Field(description="`dandelion` or `grass`: the more probable of the two classes.")
    confidence: float = Field(description="The probability of `label` (calibrated).")
    low_confidence: bool = Field(description="True when the answer is below the version's 'not sure' point.")
    in_domain: bool | None = Field(
        description="False when the photo does not look like a photo of dandelions or grass (see "
        "`out_of_domain_reason`); the label is still given. Null for a version without an in-domain score."
    )
    domain_distance: float | None = Field(
        description="How far the photo is from the training photos (the in-domain score); null without one."
    )
    neither: float | None = Field(
        description="P(neither): how much the photo looks like a kind of photo the model was taught to refuse "
        "(other flowers, ...); null for a version without that output."
    )
    out_of_domain_reason: Literal["looks_like_refused_kind", "unlike_training_photos"] | None = Field(
        description="Why `in_domain` is false: the model recognises a kind it was taught to refuse "
        "(`looks_like_refused_kind`), or the photo is too far from every training photo "
        "(`unlike_training_photos`). Null when in domain."
    )
    probabilities: dict[str, float] = Field(description="Each class's probability; they sum to 1.")
    model: ModelRef
    filename: str | None = Field(description="The upload's base name, cleaned (at most 100 characters).")
    explain: Explanation | None = Field(
        default=None,
        description="Only with `?explain=true`: where the model looked; null for a version without the map.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": PREDICTION_ID,
                    "label": "dandelion",
                    "confidence": 0.9712,
                    "low_confidence": False,
                    "in_domain": True,
                    "domain_distance": 0.4127,
                    "neither": 0.0213,
                    "out_of_domain_reason": None,
                    "probabilities": {"dandelion": 0.9712, "grass": 0.0288},
                    "model": {"name": "dandelion-grass", "version": "3"},
                    "filename": "photo.jpg",
                }
            ]
        }
    )


PREDICTION_EXAMPLES: dict[str, Any] = {
    "dandelion": {
        "summary": "A dandelion",
        "value": Prediction.model_config["json_schema_extra"]["examples"][0],  # type: ignore[index]
    },
    "another flower": {
        "summary": "A daisy: answered, and flagged as a kind the model refuses",
        "value": {
            "id": "5d41402abc4b2a76b9719d911017c592",
            "label": "dandelion",
            "confidence": 0.8823,
            "low_confidence": False,
            "in_domain": False,
            "domain_distance": 0.5011,
            "neither": 0.9342,
            "out_of_domain_reason": "looks_like_refused_kind",
            "probabilities": {"dandelion": 0.8823, "grass": 0.1177},
            "model": {"name": "dandelion-grass", "version": "3"},
            "filename": "daisy.jpg",
        },
    },
    "explained": {
        "summary": "With ?explain=true (a 3 x 3 map shown; the real one is 9 x 9)",
        "value": {
            "id": "7d793037a0760186574b0282f2f435e7",
            "label": "grass",
            "confidence": 0.9901,
            "low_confidence": False,
            "in_domain": True,
            "domain_distance": 0.3804,
            "neither": 0.0102,
            "out_of_domain_reason": None,
            "probabilities": {"dandelion": 0.0099, "grass": 0.9901},
            "model": {"name": "dandelion-grass", "version": "3"},
            "filename": "lawn.png",
            "explain": {
                "for": "grass",
                "grid": [3, 3],
                "evidence": [[0.41, 0.52, 0.38], [0.47, 0.61, 0.44], [0.29, 0.35, -0.02]],
                "png": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAMAAAADCAYAAABWKLW/AAAAKklEQVR4nAXBMRUAEBQAwONp"
                "wGz6ISWwiSWBSRru0hsmAiejoaMWbFysD3VsBWzAug9uAAAAAElFTkSuQmCC",
            },
        },
    },
}


class FeedbackAnswer(BaseModel):
    """What was recorded for a prediction."""

    prediction_id: str
    label: Literal["dandelion", "grass", "neither"] = Field(description="The label recorded.")
    predicted: str = Field(description="The label the model answered.")
    correct: bool | None = Field(
        description="Whether the answer was right; null for `neither` (no verdict on the two classes)."
    )
    in_domain: bool | None = Field(description="The answer's in-domain verdict (null: the version had no score).")
    domain_outcome: (
        Literal["confirmed_out_of_domain", "missed_out_of_domain", "wrongly_flagged", "confirmed_in_domain"] | None
    ) = Field(description="What the label says about that verdict; null when the answer had none.")
    model: ModelRef
    status: Literal["recorded", "unchanged"]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": PREDICTION_ID,
                    "label": "neither",
                    "predicted": "grass",
                    "correct": None,
                    "in_domain": False,
                    "domain_outcome": "confirmed_out_of_domain",
                    "model": {"name": "dandelion-grass", "version": "3"},
                    "status": "recorded",
                }
            ]
        }
    )


class ErrorBody(BaseModel):
    """Every refusal: a stable code and one line for people (never the request's content)."""

    error_code: str = Field(description="e.g. `INVALID_IMAGE`, `PAYLOAD_TOO_LARGE`, `MODEL_NOT_READY`.")
    message: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error_code": "INVALID_IMAGE", "message": "file 1 ('notes.jpg'): not an image file"}]
        }
    )


class Scores(BaseModel):
    """MLflow's scoring answer."""

    predictions: list[list[float]] = Field(description="Per image, the probabilities of dandelion and grass.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"predictions": [[0.97, 0.03]]}]})


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    model: ModelRef | None = Field(default=None, description="What is served, when ready.")
    reason: str | None = Field(default=None, description="Why not ready: `no model loaded` or `shutting down`.")
    last_error: str | None = Field(default=None, description="The kind of the last load failure, if any.")


class Alive(BaseModel):
    status: Literal["alive"]


class ServedModel(BaseModel):
    """The version being served (``GET /model``)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    alias: str
    run_id: str
    labels: list[str] = Field(description="Class names in output order.")
    input_shape: list[int]
    loaded_at: str
    metadata: dict[str, Any]
    drift_reference: dict[str, Any] | None
    runtime: str
    in_domain_threshold: float | None
    neither_threshold: float | None
    refused_kinds: list[str]
    low_confidence_threshold: float | None
    explains: bool = Field(description="Whether `/predict?explain=true` returns a map for this version.")
    card: bool = Field(description="Whether `GET /model/card` has this version's model card.")


def error(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for a refusal."""
    return {"model": ErrorBody, "description": description}


DEFAULT_ERROR = {"default": error("Any other refusal (405, 408, 413, 429, 431, ...): the same error body")}
"""Listed on every operation: the middlewares can refuse any request before its route runs."""


def complete_openapi(openapi: dict[str, Any]) -> dict[str, Any]:
    """What FastAPI's document gets wrong about this API, put right.

    * The examples' nulls: FastAPI writes its document without ``None`` values, examples included, so a documented
      answer would lack its required null fields (``out_of_domain_reason``, ``correct``).
    * No 422: an invalid request is answered 400 with the error body (``app.py``), not FastAPI's 422.
    * An answer documented in another media type (``/model/card``'s Markdown) is not also JSON.
    * MLflow's probes (``/ping``, ``/health``, ``/version``) answer a bare newline or version under
      ``application/json``, as MLflow's scoring server does: their empty schema is dropped, so no client (nor
      validator) takes the body for JSON.
    """
    components = openapi.get("components", {}).get("schemas", {})
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
            content = operation.get("responses", {}).get("200", {}).get("content", {})
            if len(content) > 1 and content.get("application/json") == {"schema": {}}:
                del content["application/json"]
            elif content.get("application/json") == {"schema": {}}:
                del content["application/json"]["schema"]
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for model in (Prediction, FeedbackAnswer, ErrorBody, Scores):
        if model.__name__ in components:
            components[model.__name__]["examples"] = model.model_config["json_schema_extra"]["examples"]  # type: ignore[index]
    answer = openapi.get("paths", {}).get("/predict", {}).get("post", {}).get("responses", {}).get("200")
    if answer is not None:
        answer["content"]["application/json"]["examples"] = PREDICTION_EXAMPLES
    return openapi
