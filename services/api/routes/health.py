"""Probes: Kubernetes' live/ready, and MLflow's /ping, /health and /version."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.api.deps import RuntimeDep
from services.api.errors import ModelNotReady
from services.api.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process answers (liveness)")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    summary="A model is loaded and can predict (readiness)",
    responses={503: {"description": "No model loaded yet, or shutting down"}},
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


@router.get("/ping", summary="MLflow scoring-server health check")
@router.get("/health", summary="MLflow scoring-server health check")
async def ping(runtime: RuntimeDep) -> Response:
    if runtime.current is None:
        raise ModelNotReady("no model is loaded yet")
    return Response(content="\n", media_type="application/json")


@router.get("/version", summary="The MLflow version, as MLflow's scoring server answers")
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
