"""Settings shared by both services, read from the environment (and a ``.env`` file).

Each part reads the variable names of the configuration contract (``DATABASE_URL``,
``OBJECT_STORE_URL``, ``MLFLOW_TRACKING_URI``, ...) or the ecosystem's standard ones (``AWS_*``).
Nothing else in the project reads ``os.environ``. The defaults are the embedded mode: SQLite files and a
local folder under ``./var``, so the whole pipeline runs on a laptop with no server.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_SOURCE = "https://raw.githubusercontent.com/btphan95/greenr-airflow/refs/heads/master/data"
"""The upstream data set: ``{base}/{label}/{i:08d}.jpg`` for i in 0..199."""


def settings_config(prefix: str = "") -> SettingsConfigDict:
    """The configuration every settings class of the project shares (``prefix``: its variables' prefix)."""
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        use_attribute_docstrings=True,
    )


class ObjectStoreSettings(BaseSettings):
    """Where image files, feature sets and uploads are kept: an S3 bucket or a local folder."""

    model_config = settings_config()

    url: str = Field("var/objects", validation_alias="OBJECT_STORE_URL")
    """``s3://bucket[/prefix]`` for S3 or Minio; any other value is a local folder."""
    endpoint_url: str | None = Field(None, validation_alias="S3_ENDPOINT_URL")
    """S3 endpoint (Minio, moto, ...). Unset means AWS itself."""
    access_key_id: SecretStr | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    """S3 credentials (unset: boto3's usual chain)."""
    secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    """Secret."""
    region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    """S3 region."""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


class DatabaseSettings(BaseSettings):
    """The metadata database: ``images``, ``feature_sets`` (and later ``predictions``)."""

    model_config = settings_config()

    url: SecretStr = Field(SecretStr("sqlite+aiosqlite:///var/dandelion.db"), validation_alias="DATABASE_URL")
    """SQLAlchemy async URL, e.g. ``mysql+asyncmy://user:pass@host:3306/db``. Secret: it may hold a password."""
    echo: bool = Field(False, validation_alias="DATABASE_ECHO")
    """Log every SQL statement (debugging)."""


class RegistrySettings(BaseSettings):
    """The MLflow tracking server and model registry, and which model the API serves."""

    model_config = settings_config()

    tracking_uri: str = Field("sqlite:///var/mlflow.db", validation_alias="MLFLOW_TRACKING_URI")
    """MLflow tracking server and model registry (``http://...``), or an embedded ``sqlite:///`` store."""
    s3_endpoint_url: str | None = Field(None, validation_alias="MLFLOW_S3_ENDPOINT_URL")
    """Where MLflow's S3 artifact store lives (read by MLflow itself; kept here to be shown and checked)."""
    experiment: str = Field("dandelion-grass", validation_alias="MLFLOW_EXPERIMENT_NAME")
    """Experiment the trainer's runs go to."""
    model_name: str = Field("dandelion-grass", validation_alias="MODEL_NAME")
    """Registered model the trainer registers and the API serves."""
    model_alias: str = Field("champion", validation_alias="MODEL_ALIAS")
    """Alias the quality gate moves and the API follows."""
    local_artifact_root: str = Field("var/mlartifacts", validation_alias="MLFLOW_LOCAL_ARTIFACT_ROOT")
    """Artifact folder for experiments created on an embedded (``sqlite:``) tracking store."""
