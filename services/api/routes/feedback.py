"""``POST /feedback``: the true label of a served prediction, for live accuracy and the next training run."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.api.deps import RuntimeDep, SettingsDep
from services.api.errors import BadRequest, Conflict, NotFound, TooManyRequests, Unauthorized, Unavailable
from services.api.predlog import TRUSTED_SENDER
from services.api.responses import JSONResponse
from services.api.schemas import DEFAULT_ERROR, FeedbackAnswer, error
from shared.feedback import domain_outcome
from shared.labels import LABELS, NEITHER
from shared.tables import FeedbackRow, PredictionRow

router = APIRouter(tags=["feedback"])

PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")
WAIT_FOR_LOG_S = 5.0
"""How long feedback on a prediction this replica has not written yet waits for the write."""


class Feedback(BaseModel):
    prediction_id: str = Field(description="The `id` of a `/predict` answer (or one of `/invocations`' ids).")
    label: str = Field(
        description="What the photo shows: `dandelion`, `grass`, or `neither` (something else: another flower, an "
        "animal, a document). `neither` never becomes a training photo of either class.",
        json_schema_extra={"enum": [*LABELS, NEITHER]},
    )

    model_config = ConfigDict(
        extra="forbid",  # nothing else is read: an unknown field is a mistake or a probe
        json_schema_extra={
            "examples": [
                {"prediction_id": "0f8e1c2a9b7d4e6f8a1b2c3d4e5f6a7b", "label": "grass"},
                {"prediction_id": "0f8e1c2a9b7d4e6f8a1b2c3d4e5f6a7b", "label": "neither"},
            ]
        },
    )


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": FeedbackAnswer, "description": "The same label was already recorded (nothing changed)"},
    201: {"model": FeedbackAnswer, "description": "Recorded"},
    400: error("Malformed id, unknown label or invalid body"),
    401: error("`API_FEEDBACK_TOKEN` is set and the bearer token is missing or wrong"),
    404: error("No prediction with this id (or it was dropped from the log under overload or an outage)"),
    409: error("A different label was already recorded for this prediction"),
    413: error("The body is over `API_FEEDBACK_MAX_BODY_BYTES` (4 KiB)"),
    429: error("Open feedback (no token): this client sent more than `API_FEEDBACK_RATE_PER_MINUTE`"),
    503: error("The prediction log is off or its database is unavailable"),
    **DEFAULT_ERROR,
}


@router.post("/feedback", summary="Tell the true label of a prediction", status_code=201, responses=RESPONSES)
async def feedback(
    body: Feedback,
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> JSONResponse:
    token = settings.feedback_token.get_secret_value() if settings.feedback_token else ""
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), given.strip().encode()):
            raise Unauthorized("feedback needs 'Authorization: Bearer <API_FEEDBACK_TOKEN>'")
    sender = TRUSTED_SENDER if token else (request.client.host if request.client else "unknown")[:64]
    limiter = None if token else request.app.state.feedback_limiter
    if limiter is not None and (wait := limiter.take(sender)):
        raise TooManyRequests(
            f"open feedback takes {settings.feedback_rate_per_minute:g} labels a minute per client; "
            f"try again in {wait:.0f} s",
            int(wait + 1),
        )
    if not PREDICTION_ID.fullmatch(body.prediction_id):
        raise BadRequest("prediction_id must be the 32 hexadecimal characters of a prediction's id")
    known = (*(runtime.current.labels if runtime.current else LABELS), NEITHER)
    if body.label not in known:
        raise BadRequest(f"unknown label; expected one of {', '.join(known)}")
    predlog = request.app.state.predlog
    if predlog is None:
        raise Unavailable("feedback needs the prediction log, which is off (API_PREDICTION_LOG=false)")
    if predlog.pending(body.prediction_id):  # answered by this replica a moment ago: wait for its row
        await predlog.wait_written(body.prediction_id, WAIT_FOR_LOG_S)
    try:
        return await asyncio.wait_for(_record(predlog, body, request.app.state.metrics, sender), WAIT_FOR_LOG_S + 10)
    except (NotFound, Conflict):
        raise
    except Exception as exc:
        raise Unavailable(f"the database is unavailable: {type(exc).__name__}") from exc


async def _record(predlog, body: Feedback, metrics, sender: str) -> JSONResponse:
    # Another replica may have answered it and not written its row yet (it writes every flush interval):
    # look again for a little while before calling the id unknown.
    deadline = asyncio.get_running_loop().time() + predlog.flush_interval_s + 1.0
    async with predlog.sessions() as session:
        while (prediction := await session.get(PredictionRow, body.prediction_id)) is None:
            if asyncio.get_running_loop().time() >= deadline:
                raise NotFound(f"no prediction {body.prediction_id} in the log")
            await asyncio.sleep(0.25)
        existing = await session.get(FeedbackRow, body.prediction_id)
        if existing is None:
            session.add(FeedbackRow(prediction_id=body.prediction_id, label=body.label, client=sender))
            try:
                await session.commit()
            except IntegrityError:  # the same feedback, sent twice at once: the other one won
                await session.rollback()
                query = select(FeedbackRow).where(FeedbackRow.prediction_id == body.prediction_id)
                existing = (await session.scalars(query)).first()
                if existing is None:
                    raise NotFound(f"no prediction {body.prediction_id} in the log") from None
            else:
                version = prediction.model_version
                outcome = "correct" if prediction.label == body.label else "wrong"
                outcome = NEITHER if body.label == NEITHER else outcome
                metrics.feedback.labels(version=version, outcome=outcome).inc()
                if (domain := domain_outcome(prediction.in_domain, body.label)) is not None:
                    metrics.domain_feedback.labels(version=version, outcome=domain).inc()
                return JSONResponse(_answer(prediction, body.label, "recorded"), status_code=201)
        if existing.label != body.label:
            raise Conflict(f"prediction {body.prediction_id} already has the label {existing.label!r}")
        return JSONResponse(_answer(prediction, existing.label, "unchanged"), status_code=200)


def _answer(prediction: PredictionRow, label: str, status: str) -> dict[str, object]:
    return {
        "prediction_id": prediction.id,
        "label": label,
        "predicted": prediction.label,
        "correct": None if label == NEITHER else prediction.label == label,
        "in_domain": prediction.in_domain,
        "domain_outcome": domain_outcome(prediction.in_domain, label),
        "model": {"name": prediction.model_name, "version": prediction.model_version},
        "status": status,
    }
