"""python -m services.api [--host H] [--port P] [--workers N]: run the API under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import uvicorn
from uvicorn.supervisors import Multiprocess

from services.api.connections import ServerConfig
from services.api.memory import tune_malloc
from services.api.settings import ApiSettings


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas and fix its mmap threshold (:func:`services.api.memory.tune_malloc`) unless the
    environment sets them: a soak at concurrency 32 with the hostile mix levelled at 925 MiB RSS with the
    defaults and at 710 MiB with 2 arenas. True when the arena cap is set."""
    return tune_malloc(arenas)["arenas"]


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # before any thread starts
    settings = ApiSettings()
    parser = argparse.ArgumentParser(
        prog="python -m services.api",
        description="Serve the model behind the registry alias (MODEL_NAME@MODEL_ALIAS at MLFLOW_TRACKING_URI): "
        "the upload page at /, POST /predict, POST /invocations, /metrics, /docs. Every other setting is an "
        "API_* environment variable (see the README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=settings.host, help="address to listen on (API_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port to listen on (API_PORT)")
    parser.add_argument(
        "--workers", type=int, default=settings.workers, help="processes, each with its own model (API_WORKERS)"
    )
    args = parser.parse_args(argv)
    if args.host != settings.host:  # the app says how open it is by the address it is bound to
        settings = settings.model_copy(update={"host": args.host})
        os.environ["API_HOST"] = args.host  # and so do the worker processes' apps, built from the environment
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": GRACE_S,
        "access_log": False,
        # No uvicorn limit_concurrency: it counted idle connections and refused probes; the app limits requests
        # (services.api.middleware.ConcurrencyLimitMiddleware) and idle sockets close at the header deadline.
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "header_timeout_s": settings.header_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # Forwarded headers are believed only from the proxies named: otherwise any client could pose as any
        # address (and dodge the per-client feedback limit).
        "proxy_headers": settings.forwarded_allow_ips is not None,
        "forwarded_allow_ips": settings.forwarded_allow_ips or "",
        "server_header": False,
    }
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    logging.getLogger("services.api").info(
        "open http://%s:%d/ for the upload page, /docs for the API (ready once a model is loaded: /health/ready)",
        shown,
        args.port,
    )
    raise_open_files_limit()
    if args.workers > 1:
        # Each worker process builds its own app (and loads its own model).
        config = ServerConfig("services.api.app:create_app", factory=True, workers=args.workers, **options)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    from services.api.app import create_app

    app = create_app(settings)
    _GracefulServer(ServerConfig(app, **options), app).run()
    return 0


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one: every connection is a file, and a replica that runs
    out of them cannot accept its probes either. Returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


GRACE_S = 25
"""In-flight requests get this long after SIGTERM (Kubernetes' terminationGracePeriodSeconds is 30)."""


class _GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns false at once, then uvicorn's graceful shutdown runs
    (no new connections, in-flight requests finish, the lifespan drains the batch queue), exit 0."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame) -> None:
        self._app.state.shutting_down = True
        self._app.state.metrics.ready.set(0)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down (exit status 143); a completed
        # graceful shutdown is a success, so the process exits 0 as Kubernetes and compose expect.
        self._captured_signals.clear()
