"""One planner server (a real subprocess on a loopback port) shared by the tests that do not stop or break it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.harness import ServerProcess, register_request, start_server, tiny_workload


@pytest.fixture(scope="session")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory.mktemp("planner"),
        "--budget-ms",
        "50",
        "--max-message-bytes",
        str(1 << 20),
        "--max-microbatches",
        "64",
        "--max-documents",
        "256",
        "--max-media",
        "32",
    )
    yield server
    code = server.stop()
    assert code == 0, server.log()


@pytest.fixture(scope="session")
def job_id(planner: ServerProcess) -> str:
    """A registered tiny two-rank VLM job on the shared server."""
    response = planner.stub().RegisterJob(register_request(tiny_workload()), timeout=120)
    return str(response.job_id)
