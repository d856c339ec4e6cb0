"""SQLAlchemy 2 typed tables: ingested images, feature-set versions, served predictions and their feedback."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    """An image file in the object store. Written only after its object exists."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(32), index=True)
    """``dandelion``, ``grass``, or ``neither`` (a photo the model learns to refuse: see ``kind``)."""
    source: Mapped[str] = mapped_column(String(1024))
    """Where the file was read from: its path, URL, or ``feedback:{prediction id}``."""
    object_key: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    byte_size: Mapped[int] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    origin: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The source's short name (``dandelion-grass``, ``flowers``, ``feedback``): what cross-source estimates and
    the model card group photos by. NULL for rows ingested before sources had names."""
    kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """What the photo shows within its label: the source's subfolder (``daisy``, ``rose``, ...) for ``neither``
    photos, the label itself otherwise."""
    rgb_r_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    rgb_r_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    rgb_g_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    rgb_g_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    rgb_b_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    rgb_b_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_h_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_h_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_s_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_s_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_v_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    hsv_v_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The colour descriptors (``shared.descriptors``), computed once at ingest; NULL for rows ingested before
    (the feature store fills them in)."""


class FeatureSetRow(Base):
    """One immutable Parquet snapshot of the images, their split and their descriptive features."""

    __tablename__ = "feature_sets"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(255))
    row_count: Mapped[int] = mapped_column(Integer)
    schema: Mapped[dict[str, Any]] = mapped_column(JSON)
    source_snapshot: Mapped[str] = mapped_column(String(64))
    """sha256 over the sorted image hashes it was built from: equal snapshots mean equal data."""
    split_counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EmbeddingShardRow(Base):
    """One Parquet file of backbone embeddings in the object store (``embeddings/{spec}/...``)."""

    __tablename__ = "embedding_shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    spec: Mapped[str] = mapped_column(String(128), index=True)
    """What computed them: backbone, weights, working side (``services.trainer.embeddings.EmbeddingSpec``)."""
    object_key: Mapped[str] = mapped_column(String(255), unique=True)
    rows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EmbeddingRow(Base):
    """Where the embedding of one view of one image is: computed once per (image, spec, view), never again."""

    __tablename__ = "embeddings"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str] = mapped_column(String(128), primary_key=True)
    view: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard_id: Mapped[int] = mapped_column(Integer, ForeignKey("embedding_shards.id"), index=True)


class PredictionRow(Base):
    """One image classified by the API (written in batches, in the background; see ``services.api.predlog``).

    The descriptor columns are the feature store's (:data:`shared.descriptors.DESCRIPTOR_COLUMNS`), computed
    by the same code, so live inputs can be compared with training data column by column.
    """

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """The prediction id the API returned (32 hex characters)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    endpoint: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32), index=True)
    label: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    """From the request's arrival to its answer (decoding, queueing and the forward pass)."""
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    image_key: Mapped[str | None] = mapped_column(String(255))
    """Object key of the uploaded file when ``API_STORE_UPLOADS`` is on; NULL otherwise."""
    domain_distance: Mapped[float | None] = mapped_column(Float, nullable=True)
    """In-domain distance of the input (``services.trainer.indomain``); NULL for models without the score."""
    in_domain: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """False when the distance was above the answering version's threshold: "neither dandelion nor grass"."""
    width: Mapped[float] = mapped_column(Float)
    height: Mapped[float] = mapped_column(Float)
    rgb_r_mean: Mapped[float] = mapped_column(Float)
    rgb_r_std: Mapped[float] = mapped_column(Float)
    rgb_g_mean: Mapped[float] = mapped_column(Float)
    rgb_g_std: Mapped[float] = mapped_column(Float)
    rgb_b_mean: Mapped[float] = mapped_column(Float)
    rgb_b_std: Mapped[float] = mapped_column(Float)
    hsv_h_mean: Mapped[float] = mapped_column(Float)
    hsv_h_std: Mapped[float] = mapped_column(Float)
    hsv_s_mean: Mapped[float] = mapped_column(Float)
    hsv_s_std: Mapped[float] = mapped_column(Float)
    hsv_v_mean: Mapped[float] = mapped_column(Float)
    hsv_v_std: Mapped[float] = mapped_column(Float)


class FeedbackRow(Base):
    """The true label of a prediction, as told by a user (``POST /feedback``); one per prediction."""

    __tablename__ = "feedback"

    prediction_id: Mapped[str] = mapped_column(String(32), ForeignKey("predictions.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Who sent the label: ``token`` when it came with ``API_FEEDBACK_TOKEN`` (trusted), else the client's address
    (open feedback); NULL for labels kept before this column. Live accuracy counts distinct senders."""
