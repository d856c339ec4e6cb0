"""``python -m tests.reliability.fake_api --port P``: the API's own CLI (``services.api.cli``: its server,
protocol and malloc settings) serving the fake model, for tests that watch a real process's memory, files and
sockets without training a model first."""

from __future__ import annotations

import functools
import sys

import services.api.app as app_module
from services.api import cli
from tests.api.fakes import FakeSource

if __name__ == "__main__":
    app_module.create_app = functools.partial(app_module.create_app, source=FakeSource())
    sys.exit(cli.main())
