from __future__ import annotations

import pytest
from client_fakes import FakeServer, start_fake_server


@pytest.fixture
def fake_server() -> FakeServer:
    server = start_fake_server()
    yield server
    server.stop()
