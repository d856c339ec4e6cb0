"""What is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from services.api.deps import RuntimeDep
from services.api.errors import ModelNotReady, NotFound
from services.api.schemas import DEFAULT_ERROR, ServedModel, error

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    summary="The model being served: name, version, alias, run, label order, input shape",
    responses={200: {"model": ServedModel}, 503: error("No model loaded yet"), **DEFAULT_ERROR},
)
async def model(runtime: RuntimeDep) -> dict[str, Any]:
    current = runtime.current
    if current is None:
        raise ModelNotReady("no model is loaded yet")
    return current.describe()


@router.get(
    "/model/card",
    summary="The served version's model card (Markdown): what it is for, its data, recipe and evidence",
    responses={
        200: {"content": {"text/markdown": {"schema": {"type": "string"}}}},
        404: error("This version has no card"),
        503: error("No model loaded yet"),
        **DEFAULT_ERROR,
    },
)
async def card(runtime: RuntimeDep) -> PlainTextResponse:
    current = runtime.current
    if current is None:
        raise ModelNotReady("no model is loaded yet")
    if current.card is None:
        raise NotFound(f"version {current.version} has no model card (trained before cards existed)")
    return PlainTextResponse(current.card, media_type="text/markdown; charset=utf-8")
