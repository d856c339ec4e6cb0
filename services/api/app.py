"""``create_app(settings)``: the FastAPI application, its lifespan and its one error renderer."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from services.api.batching import Batcher
from services.api.drift import DriftMonitor
from services.api.errors import ApiError
from services.api.keep import UploadQuota
from services.api.memory import IdleTrimmer
from services.api.metrics import HTTP_LATENCY_BUCKETS, ApiMetrics
from services.api.middleware import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    HeaderLimitMiddleware,
    HeadMiddleware,
    MeterMethodAsOther,
    RequestFramingMiddleware,
    RestoreMethod,
    error_response,
)
from services.api.predlog import PredictionLog
from services.api.ratelimit import RateLimiter
from services.api.registry import MlflowSource
from services.api.responses import JSONResponse
from services.api.routes import docs, feedback, health, invocations, model, page, predict
from services.api.runtime import LoadedModel, ModelRuntime, ModelSource
from services.api.schemas import complete_openapi
from services.api.service import Classifier
from services.api.settings import ApiSettings
from services.api.uploads import BodyBudget
from shared.db import sqlite_file
from shared.images import ImageLimits

log = logging.getLogger(__name__)

PREDICTION_LOG_STOP_S = 3.0
"""At shutdown, how long the prediction log may take to write what it holds before it is cancelled."""

PROBES = frozenset({"/metrics", "/health/live", "/health/ready", "/ping", "/health"})
"""Probes and the scrape: never metered, never refused by the concurrency limit."""
HTTP_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that hung up before the answer: counted as a client error, never as 5xx."""


def create_app(settings: ApiSettings | None = None, source: ModelSource | None = None) -> FastAPI:
    """The app; ``source`` replaces the MLflow registry (tests pass a fake)."""
    settings = settings or ApiSettings()
    metrics = ApiMetrics(prediction_log=settings.prediction_log)
    drift = DriftMonitor(settings.drift_window, settings.drift_min_samples, settings.low_confidence_threshold)
    metrics.registry.register(drift)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = ModelRuntime(
            source or MlflowSource(settings.registry, settings.runtime, settings.inference_threads or None),
            metrics,
            poll_interval_s=settings.poll_interval_s,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
            no_model_retry_s=settings.no_model_retry_s,
        )
        batcher = Batcher(runtime, metrics, settings.max_batch_size, settings.max_batch_wait_ms / 1000)
        limits = ImageLimits(
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            max_decode_bytes=settings.max_decode_bytes,
        )
        predlog = _prediction_log(settings, metrics)

        def swapped(model: LoadedModel) -> None:
            drift.set_reference(model.metadata, f"{model.name} v{model.version}")
            # "Not sure" in the share means what it means in the answers: the served version's threshold.
            low = model.low_confidence_threshold
            drift.low_confidence = settings.low_confidence_threshold if low is None else low
            if predlog is not None:
                predlog.serving = (model.name, model.version)

        runtime.on_swap.append(swapped)
        app.state.runtime = runtime
        app.state.predlog = predlog
        app.state.classifier = Classifier(
            batcher,
            metrics,
            limits,
            settings.max_instances,
            settings.request_timeout_s,
            drift=drift,
            predlog=predlog,
            low_confidence=settings.low_confidence_threshold,
            decode_concurrency=settings.decode_concurrency,
            decode_timeout_s=settings.decode_timeout_s,
            parse_concurrency=settings.parse_concurrency,
            trimmer=app.state.trimmer,
            keep=UploadQuota(settings.store_uploads_client_bytes_per_hour, settings.store_uploads_bytes_per_hour),
        )
        batcher.start()
        tasks = [asyncio.create_task(runtime.run(), name="model-runtime")]
        trimming = asyncio.create_task(app.state.trimmer.run(), name="malloc-trim")
        if predlog is not None:
            tasks.append(asyncio.create_task(predlog.run(), name="prediction-log"))
            tasks[-1].add_done_callback(_report_stopped)
        try:
            yield
        finally:
            app.state.shutting_down = True
            metrics.ready.set(0)
            await batcher.stop()
            await app.state.classifier.drain()  # observations still being described reach the log's last flush
            if predlog is not None:  # the log writes what it holds; cancelled (and flushed once more) if it hangs
                predlog.stop()
                await asyncio.wait(tasks[1:], timeout=PREDICTION_LOG_STOP_S)
            for task in [*tasks, trimming]:
                task.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):  # a crash was reported when it happened
                    await task

    app = FastAPI(
        title="Dandelion or grass",
        version="1.0",
        description="Classifies photos as dandelion or grass with the model behind the registry alias. "
        "`/predict` takes image files; `/invocations` speaks MLflow's scoring protocol.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        # No trailing-slash redirects: they echoed the Host header and minted a metric series per random path.
        redirect_slashes=False,
        docs_url=None,  # served from local assets with security headers (routes/docs.py)
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    open_feedback = settings.feedback_token is None and settings.feedback_rate_per_minute > 0
    app.state.feedback_limiter = RateLimiter(settings.feedback_rate_per_minute) if open_feedback else None
    app.state.metrics = metrics
    app.state.shutting_down = False
    app.state.predlog = None
    app.state.drift = drift
    app.state.trimmer = IdleTrimmer()
    app.state.body_budget = BodyBudget(settings.body_buffer_bytes, on_release=app.state.trimmer.note)

    for router in (predict.router, invocations.router, feedback.router, model.router, health.router, page.router):
        app.include_router(router)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if settings.docs:
        app.include_router(docs.router)

    _install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        per_path={"/feedback": settings.feedback_max_body_bytes},
        read_timeout_s=settings.body_read_timeout_s,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    if settings.allowed_hosts != ["*"]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts, www_redirect=False)
    app.add_middleware(HeaderLimitMiddleware, max_count=settings.max_header_count, max_bytes=settings.max_header_bytes)
    app.add_middleware(RequestFramingMiddleware)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.limit_concurrency, exempt=PROBES)
    app.add_middleware(RestoreMethod)
    # Only routes are metered, by their template: a random path must not become a new series.
    instrumentator = Instrumentator(
        excluded_handlers=sorted(PROBES), registry=metrics.registry, should_ignore_untemplated=True
    )
    instrumentator.instrument(app, latency_lowr_buckets=HTTP_LATENCY_BUCKETS).expose(app, include_in_schema=False)
    app.add_middleware(MeterMethodAsOther)  # outside the metrics: an invented method name adds no series
    return app


def _report_stopped(task: asyncio.Task) -> None:
    """A background task that ends by itself (not cancelled) is a bug: say so loudly, once."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r; predictions are no longer logged", task.get_name(), task.exception())


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only (``0.0.0.0`` and ``::`` are not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _prediction_log(settings: ApiSettings, metrics: ApiMetrics) -> PredictionLog | None:
    if not settings.prediction_log:
        return None
    if settings.feedback_token is None:
        if is_loopback(settings.host):
            # Only this machine reaches it: one line, not the full warning.
            log.warning("POST /feedback is open (no API_FEEDBACK_TOKEN): fine on %s, set one before exposing the API",
                        settings.host)  # fmt: skip
        else:
            log.warning(
                "POST /feedback is open (API_FEEDBACK_TOKEN is unset) on %s: anyone who reaches the API can label "
                "predictions, which moves model_live_accuracy and can fire LiveAccuracyLow%s; %s per client a "
                "minute. Set API_FEEDBACK_TOKEN unless only trusted clients reach the API",
                settings.host,
                ", and (uploads are kept) adds training photos" if settings.store_uploads else "",
                f"limited to {settings.feedback_rate_per_minute:g}"
                if settings.feedback_rate_per_minute
                else "not limited",
            )
    if (database := sqlite_file(settings.database.url.get_secret_value())) is not None:
        log.info("prediction log: %s", database.resolve())  # say where, in case it is not where it was meant
    return PredictionLog(
        settings.database,
        metrics,
        store=settings.store if settings.store_uploads else None,
        max_queue=settings.prediction_log_max_queue,
        batch_size=settings.prediction_log_batch_size,
        flush_interval_s=settings.prediction_log_flush_interval_s,
        max_upload_bytes_queued=settings.prediction_log_max_upload_bytes,
        accuracy_refresh_s=settings.live_accuracy_refresh_s,
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and what, never the offending input itself.
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()[:5])
        return error_response(400, "BAD_REQUEST", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        code = HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
        headers = dict(exc.headers or {})
        allow = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        if "GET" in allow and "HEAD" not in allow:  # HeadMiddleware answers HEAD wherever GET is answered
            headers["Allow"] = ", ".join([*allow, "HEAD"])
        return error_response(exc.status_code, code, message[:300], headers=headers or None)  # e.g. 405's Allow

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads this answer; it is counted (and logged once, briefly) as the client's doing.
        log.info("%s %s: the client hung up before its request was read (%d)", request.method,
                 request.url.path, CLIENT_CLOSED_REQUEST)  # fmt: skip
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; it has been logged")
