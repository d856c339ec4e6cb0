"""Probes: Kubernetes' live/ready, and MLflow's /ping, /health and /version."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.api.deps import RuntimeDep
from services.api.errors import ModelNotReady
from services.api.responses import JSONResponse
from services.api.schemas import DEFAULT_ERROR, Alive, Ready, error

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process answers (liveness)", response_model=Alive)
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    summary="A model is loaded and can predict (readiness)",
    responses={
        200: {"model": Ready, "description": "Ready: `status` and `model`"},
        503: {"model": Ready, "description": "No model loaded yet, or shutting down: `status`, `reason`, `last_error`"},
        **DEFAULT_ERROR,
    },
)
async def ready(request: Request, runtime: RuntimeDep) -> JSONResponse:
    model = runtime.current
    if model is None or request.app.state.shutting_down:
        reason = "shutting down" if request.app.state.shutting_down else "no model loaded"
        # A category only: the error itself can name hosts and paths (it is in the log).
        return JSONResponse(
            {"status": "not ready", "reason": reason, "last_error": runtime.last_error_kind}, status_code=503
        )
    return JSONResponse({"status": "ready", "model": {"name": model.name, "version": model.version}})


MLFLOW_PING = {
    200: {"description": "A model is loaded: a bare newline, as MLflow's scoring server answers",
          "content": {"application/json": {}}},
    503: error("No model loaded yet"),
    **DEFAULT_ERROR,
}  # fmt: skip


@router.get("/ping", summary="MLflow scoring-server health check", responses=MLFLOW_PING)
@router.get("/health", summary="MLflow scoring-server health check", responses=MLFLOW_PING)
async def ping(runtime: RuntimeDep) -> Response:
    if runtime.current is None:
        raise ModelNotReady("no model is loaded yet")
    return Response(content="\n", media_type="application/json")


@router.get(
    "/version",
    summary="The MLflow version, as MLflow's scoring server answers (the bare version, e.g. 3.1.0)",
    responses={200: {"description": "The version (not JSON)", "content": {"application/json": {}}}, **DEFAULT_ERROR},
)
async def version() -> Response:
    return Response(content=mlflow_version(), media_type="application/json")


def mlflow_version() -> str:
    """MLflow's version: the full distribution's where it is installed, else its client's (the API image)."""
    for distribution in ("mlflow", "mlflow-skinny"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
