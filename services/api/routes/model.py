"""What is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from services.api.deps import RuntimeDep
from services.api.errors import ModelNotReady

router = APIRouter(tags=["model"])


@router.get("/model", summary="The model being served: name, version, alias, run, label order, input shape")
async def model(runtime: RuntimeDep) -> dict[str, Any]:
    current = runtime.current
    if current is None:
        raise ModelNotReady("no model is loaded yet")
    return current.describe()
