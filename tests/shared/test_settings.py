"""Settings: embedded defaults need no server; the contract's variable names configure the real stack."""

from __future__ import annotations

import pytest

from services.api.settings import ApiSettings
from services.trainer.settings import TrainerSettings
from shared.settings import DEFAULT_DATA_SOURCE, DatabaseSettings, ObjectStoreSettings, RegistrySettings

CONTRACT = (
    "DATABASE_URL",
    "OBJECT_STORE_URL",
    "S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MODEL_NAME",
    "MODEL_ALIAS",
    "DATA_SOURCE",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    for name in CONTRACT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    return monkeypatch


def test_embedded_defaults_need_no_server(clean_env) -> None:
    settings = TrainerSettings()
    assert settings.database.url.get_secret_value().startswith("sqlite+aiosqlite:///")
    assert not settings.store.is_s3
    assert settings.registry.tracking_uri.startswith("sqlite:///")
    assert settings.registry.model_name == "dandelion-grass"
    assert settings.registry.model_alias == "champion"
    assert settings.data_source == DEFAULT_DATA_SOURCE
    assert ApiSettings().registry == settings.registry


def test_contract_variables(clean_env) -> None:
    env = {
        "DATABASE_URL": "mysql+asyncmy://app:s3cret@mysql:3306/dandelion",
        "OBJECT_STORE_URL": "s3://dandelion/prod",
        "S3_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "MODEL_NAME": "dg",
        "MODEL_ALIAS": "prod",
        "DATA_SOURCE": "/data/photos",
        "TRAINER_RESOLUTION": "256",
        "API_PORT": "9000",
        "API_MAX_BATCH_SIZE": "1",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    trainer, api = TrainerSettings(), ApiSettings()
    assert trainer.database.url.get_secret_value() == env["DATABASE_URL"]
    assert trainer.store.is_s3 and trainer.store.url == "s3://dandelion/prod"
    assert trainer.store.endpoint_url == "http://minio:9000"
    assert trainer.store.access_key_id.get_secret_value() == "key"
    assert trainer.store.region == "eu-west-3"
    assert trainer.registry.tracking_uri == "http://mlflow:5000"
    assert trainer.registry.s3_endpoint_url == "http://minio:9000"
    assert (trainer.registry.model_name, trainer.registry.model_alias) == ("dg", "prod")
    assert trainer.data_source == "/data/photos"
    assert trainer.resolution == 256
    assert (api.port, api.max_batch_size) == (9000, 1)
    assert api.registry.model_alias == "prod"


def test_secrets_are_not_printed(clean_env) -> None:
    clean_env.setenv("DATABASE_URL", "mysql+asyncmy://app:s3cret@mysql/db")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    text = repr(TrainerSettings()) + str(DatabaseSettings()) + str(ObjectStoreSettings())
    assert "s3cret" not in text and "very-secret" not in text


def test_settings_are_immutable(clean_env) -> None:
    with pytest.raises(ValueError, match="frozen"):
        RegistrySettings().model_name = "x"  # type: ignore[misc]


def test_dotenv_file_is_read(clean_env, tmp_path) -> None:
    (tmp_path / ".env").write_text("MODEL_NAME=from-dotenv\nTRAINER_SEED=3\n")
    settings = TrainerSettings()
    assert settings.registry.model_name == "from-dotenv"
    assert settings.seed == 3
