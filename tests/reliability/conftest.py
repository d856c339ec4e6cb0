"""The API unit fixtures (fake model behind the real app), shared with the reliability tests."""

from tests.api.conftest import api_settings, client, source  # noqa: F401
