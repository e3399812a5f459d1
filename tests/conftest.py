"""Shared fixtures. Real services only: a real `mlflow server` process, no mocks."""
from __future__ import annotations

import os

import pytest

from tests.fixtures_data import digits_data, digits_dataset  # noqa: F401  (session fixtures)
from tests.fixtures_sweep import demo_sweep_output, ich_home, monkeypatch_session, ray_local, tiny_sweep  # noqa: F401
from tests.netns import ns_cluster, ns_ray_cluster  # noqa: F401  (SSH nodes in namespaces, session)


def in_ci() -> bool:
    """CI services set CI=true (GitHub Actions, GitLab CI): there a missing service is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_service(reason: str) -> None:
    """A service a test needs (PostgreSQL, Chromium, sshd, network namespaces) is missing: the test skips on a
    developer's machine, and FAILS under CI=true, so CI cannot go green by skipping the check it is named after."""
    if in_ci():
        pytest.fail(f"required service missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------ no skips in CI
# Under CI=true a skipped test fails the run (exit 1, one line), whatever skipped it: a skip proves nothing, and
# CI must not go green on tests that did not run. Expected failures (xfail) are not skips.

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and report.nodeid not in _skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if in_ci() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if in_ci() and _skipped:
        terminalreporter.write_line(f"FAILED under CI=true: {len(_skipped)} test(s) skipped, e.g. {_skipped[0]} "
                                    "(a skip is a failure in CI)", red=True)


# ------------------------------------------------------------------------------------------ MLflow server


@pytest.fixture(scope="session")
def mlflow_server_handle(tmp_path_factory):
    """One real `mlflow server` (SQLite store, proxied artifacts in a temp folder) for the whole session.

    Session-scoped because the server takes seconds to start. MLFLOW_TRACKING_URI points at it for the
    session and is restored afterwards.
    """
    from soups.tracking_server import free_port, start_server

    # A random free port, never the default 5000 a concurrent session or `make demo` may be starting a server on:
    # start_server trusts whatever answers /health on its port.
    handle = start_server(tmp_path_factory.mktemp("mlflow-session"), port=free_port())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", handle.uri)
        try:
            yield handle
        finally:
            handle.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_handle) -> str:
    """The tracking URI of the session's MLflow server."""
    return mlflow_server_handle.uri


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)
