"""Fixtures of the e2e tests: one server per test module, stopped when the module ends."""

from __future__ import annotations

import pytest
from e2e_server import ServerProcess


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start servers for one test module; all are stopped (SIGTERM) when the module ends."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, log_dir, env)
        started.append(server)
        return server.wait_healthy()

    yield start
    for server in started:
        server.stop()
