"""The API's one settings object: the shared registry part plus its own ``API_*`` knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from shared.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings, settings_config


class ApiSettings(BaseSettings):
    model_config = settings_config("API_")

    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    """Where the prediction log and feedback go (``DATABASE_URL``, the trainer's database)."""
    store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    """Where uploads go when ``store_uploads`` is on (``OBJECT_STORE_URL``, the trainer's store)."""

    host: str = "127.0.0.1"
    """Address to listen on (``0.0.0.0`` in the images)."""
    port: int = 8000
    """Port to listen on; also the image's health check's."""
    workers: int = 1
    """Each worker process loads its own model; scale with replicas rather than workers."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""

    poll_interval_s: float = 30.0
    """How often the registry is asked whether the alias points to a new version."""
    retry_initial_s: float = 1.0
    """First wait before asking the registry again after a failed load."""
    retry_max_s: float = 30.0
    """Backoff bounds while no model could be loaded yet (registry down, alias missing)."""
    no_model_retry_s: float = 5.0
    """The backoff's bound while the registry answers that no model is registered under the alias yet."""

    runtime: Literal["auto", "litert", "tensorflow"] = "auto"
    """What runs the model: ``auto`` takes the version's LiteRT export when it has one (no TensorFlow in the
    process), else TensorFlow; ``litert`` refuses a version without the export; ``tensorflow`` always."""
    inference_threads: int = 0
    """Threads of one forward pass; 0 means one per CPU."""

    max_batch_size: int = 16
    """Most images per forward pass; 1 turns micro-batching off."""
    max_batch_wait_ms: float = 2.0
    """How long the first request of a batch waits for batch-mates (only while the model is busy)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest single image file accepted by /predict."""
    max_files: int = 16
    """Most ``file`` parts in one /predict request."""
    body_buffer_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Most bytes of request bodies (``/predict`` files, ``/invocations`` JSON) all requests in progress hold
    together, in memory (nothing is written to disk); a request that would pass it answers 503 with
    ``Retry-After`` as its bytes arrive. Each file is also cut off at ``max_upload_bytes`` and each body at
    ``max_body_bytes``."""
    max_pixels: int = 40_000_000
    """Largest image (width x height) decoded; larger ones are refused before decoding (bomb guard)."""
    max_decode_bytes: int = 128 * 1024 * 1024
    """Most memory one image's decode may hold (pixels x the bytes per pixel of each full-size form it takes:
    see ``shared.images.full_size_bytes_per_pixel``); larger ones answer 413 before a pixel is decoded."""
    decode_concurrency: int = Field(2, ge=1)
    """Images decoded at once, across all requests (the others wait their turn). With the defaults the worst
    decodes hold 2 x ~135 MiB beside the loaded model (~0.5 GiB): well inside the pod's 2 GiB limit."""
    decode_timeout_s: float = Field(10.0, gt=0)
    """An image still decoding after this answers 504 (a turn waited for counts too); the sizes above keep
    the slowest allowed decode near one second on two cores."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body of any kind (a 224 x 224 x 3 JSON image is about 1-3 MB)."""
    max_instances: int = 64
    """Most images in one /invocations request."""
    parse_concurrency: int = Field(1, ge=1)
    """``/invocations`` bodies over 4 MiB (a few images) parsed at once, across requests; the others wait their
    turn. Each such parse holds up to ~6x its body (simdjson's document, the numbers as float64 and float32);
    one image's body (~1.7 MB) is never held back."""
    request_timeout_s: float = 30.0
    """A request still waiting for the model after this answers 503 instead of hanging."""

    cors_origins: list[str] = []
    """Origins allowed to call the API from a browser; empty (the default) means none."""
    allowed_hosts: list[str] = ["*"]
    """Host headers answered (e.g. ``["dandelion.example.org"]``); others get 400. ``*`` answers any: the API
    builds no URL from the Host header, so the default is safe behind an ingress that checks it."""
    forwarded_allow_ips: str | None = None
    """Proxies whose ``X-Forwarded-For``/``-Proto`` are believed (uvicorn's ``--forwarded-allow-ips``, e.g. the
    ingress's address). Unset: forwarded headers are ignored and the client is the TCP peer."""
    docs: bool = True
    """Serve the OpenAPI page at ``/docs`` (from local assets) and the schema at ``/openapi.json``."""
    limit_concurrency: int = Field(512, ge=1)
    """Requests handled at once; beyond it the API answers 503 at once. Probes (``/health/*``, ``/ping``) and
    ``/metrics`` are always answered, and idle connections do not count."""
    timeout_keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A connection whose request headers are not complete this long after it opened (or after the request's
    first byte, on a kept-alive connection) is closed: idle and slow-header sockets hold nothing for long."""
    body_read_timeout_s: float = 30.0
    """A request body that has not fully arrived after this answers 408 (slow-body clients hold no worker)."""
    max_header_count: int = 100
    """Most request headers (431 beyond)."""
    max_header_bytes: int = 16 * 1024
    """Requests with more headers, or more bytes of them, answer 431."""

    prediction_log: bool = True
    """Record every prediction in the ``predictions`` table (in the background; see services/api/predlog.py)."""
    store_uploads: bool = False
    """Also keep each uploaded photo in the object store (``uploads/...``), so that photos with feedback can be
    trained on. Off by default: uploads may be personal data; turn it on only where that is allowed."""
    store_uploads_client_bytes_per_hour: int = Field(32 * 1024 * 1024, ge=0)
    """With ``store_uploads``: most bytes of one client's uploads kept an hour (by address); beyond it, its
    predictions are logged without their photos."""
    store_uploads_bytes_per_hour: int = Field(1024 * 1024 * 1024, ge=0)
    """With ``store_uploads``: most bytes of uploads this replica keeps an hour, all clients together."""
    prediction_log_max_queue: int = 10_000
    """Most predictions waiting to be written; beyond it (overload, long outage) they are dropped and counted."""
    prediction_log_batch_size: int = 500
    """Most rows in one INSERT of the prediction log."""
    prediction_log_flush_interval_s: float = 1.0
    """Seconds between writes of the prediction log."""
    prediction_log_max_upload_bytes: int = 64 * 1024 * 1024
    """Most bytes of uploads waiting to be stored; beyond it a row is logged without its photo."""
    live_accuracy_refresh_s: float = 30.0
    """How often the live-accuracy gauge is recomputed from the feedback in the database."""

    drift_window: int = 500
    """Recent inputs over which input drift and the low-confidence share are computed."""
    drift_min_samples: int = 300
    """Inputs needed in the window before drift is exported (fewer are too noisy: see TRAINER_DRIFT_MIN_SAMPLES)."""
    low_confidence_threshold: float = 0.7
    """Below this confidence an answer is "not sure", for versions whose metadata sets no threshold of their own
    (the trainer's set one from their calibrated reliability curve)."""
    feedback_token: SecretStr | None = None
    """When set, ``POST /feedback`` needs ``Authorization: Bearer <token>``: feedback becomes training data.
    At least 16 characters, and not a template's placeholder; empty means unset: feedback is then open to
    anyone who reaches the API (the upload page's buttons use it), which the API warns about at start."""
    feedback_rate_per_minute: float = Field(30.0, ge=0)
    """Open feedback only: labels accepted per client address and minute (bursts of as many); 0 = no limit."""
    feedback_max_body_bytes: int = 4096
    """Largest ``POST /feedback`` body (a real one is under 100 bytes)."""

    @field_validator("feedback_token")
    @classmethod
    def _real_token(cls, token: SecretStr | None) -> SecretStr | None:
        value = token.get_secret_value().strip() if token else ""
        if not value:
            return None
        if len(value) < 16 or any(word in value.lower() for word in ("replace_me", "change-me", "changeme")):
            raise ValueError("API_FEEDBACK_TOKEN must be a real secret of 16+ characters (openssl rand -hex 32)")
        return SecretStr(value)
