"""Dependency aliases for the routes: the app's state, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.api.runtime import ModelRuntime
from services.api.service import Classifier
from services.api.settings import ApiSettings


# async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per dependency per request.
async def _classifier(request: Request) -> Classifier:
    return request.app.state.classifier


async def _runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


async def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


ClassifierDep = Annotated[Classifier, Depends(_classifier)]
RuntimeDep = Annotated[ModelRuntime, Depends(_runtime)]
SettingsDep = Annotated[ApiSettings, Depends(_settings)]
