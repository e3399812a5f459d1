"""Every MLflow call goes through `call_with_retry`, so a server that is down for a restart (~1.5 min) does not
fail a sweep; RegistryError when an error persists (or the answer is not MLflow's). Importing this module lowers
MLflow's own HTTP retries (unless set in the environment) so the two layers of backoff do not multiply into minutes
per call; soups/store/registry.py imports it, so importing the registry does too, as before.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import requests
from mlflow.exceptions import MlflowException, RestException

from ich.errors import IchError
from soups.supervise import FIRST_DELAY_S
from soups.tracking_server import HEALTH_TIMEOUT_S

log = logging.getLogger(__name__)

# HTTP statuses worth another try: the server restarting, overloaded, or SQLite briefly locked.
TRANSIENT_HTTP_STATUSES = {408, 429, 500, 502, 503, 504}
# An overloaded server answers some of these as 400 BAD_REQUEST (its database connection pool or SQLite lock
# timed out under load): the request was fine, so these are tried again too.
# An overloaded store, and two runs logging the same new dataset at once: MLflow checks, then inserts, so the loser of
# that race gets a UNIQUE violation on `datasets`; tried again, it finds the winner's row.
TRANSIENT_SERVER_MESSAGES = ("QueuePool limit", "database is locked",
                             "UNIQUE constraint failed: datasets.", 'unique constraint "dataset_pk"')

# MLflow's client retries 7 times with backoff factor 2 (minutes per call when the server is down);
# one quick inner retry (a stale keep-alive connection) is enough, RetryPolicy does the waiting.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network on workers
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per pull floods worker logs

T = TypeVar("T")


class RegistryError(IchError):
    """An MLflow call that kept failing, or a registry record that cannot be used; one line, naming it."""


@dataclass
class RetryPolicy:
    """Exponential backoff: base_s, 2*base_s, ... capped at max_s; 14 attempts wait ~96 s in total."""
    attempts: int = 14
    base_s: float = 0.5
    max_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (attempt - 1))

    def total_wait(self) -> float:
        """Seconds slept between the first and the last attempt."""
        return sum(self.delay(a) for a in range(1, self.attempts))


# One call outlasts a restart of the head's supervised MLflow server (soups/supervise.py): the supervisor's
# first restart delay plus the start-up time the project allows a server (tracking_server.HEALTH_TIMEOUT_S;
# ~11 s idle, much longer on a loaded head). tests/test_supervised_server.py checks the sum.
SERVER_RESTART_S = FIRST_DELAY_S + HEALTH_TIMEOUT_S
DEFAULT_RETRY = RetryPolicy()


def is_garbled_answer(error: BaseException) -> bool:
    """MLflow's error for an answer whose status was 200 but whose body is not JSON."""
    return isinstance(error, MlflowException) and "response body was not in a valid JSON format" in str(error.message)


def is_transient(error: BaseException) -> bool:
    """Connection refused/reset, timeouts and 5xx/429 answers: worth retrying. Anything else is not."""
    seen = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, requests.HTTPError) and seen.response is not None:
            return seen.response.status_code in TRANSIENT_HTTP_STATUSES
        if isinstance(seen, RestException):
            return (seen.get_http_status_code() in TRANSIENT_HTTP_STATUSES
                    or any(m in str(seen.message) for m in TRANSIENT_SERVER_MESSAGES))
        if is_garbled_answer(seen):
            return False  # a 200 whose body is not JSON: a broken or impersonated server, not an outage
        if isinstance(seen, MlflowException) and str(seen.message).startswith("API request to"):
            return True  # MLflow wraps connection errors in this message (without a cause, sometimes)
        seen = seen.__cause__ or seen.__context__
    return False


_retries = 0  # calls this process tried again after a transient error (read by retry_count)


def retry_count() -> int:
    """How many MLflow calls failed transiently and were tried again in this process so far. A trial reports
    its share as the metric `mlflow_retries`, so an outage the sweep rode out is visible, not only survived."""
    return _retries


def call_with_retry(what: str, fn: Callable[..., T], *args: Any, retry: RetryPolicy | None = None, **kwargs: Any) -> T:
    """fn(*args, **kwargs), retried with backoff on transient errors; RegistryError when they persist."""
    global _retries
    policy = retry or DEFAULT_RETRY
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if is_garbled_answer(e):  # one line, not 96 s of retries nor a traceback
                raise RegistryError(f"MLflow {what}: {str(e).strip().splitlines()[0][:300]}") from None
            if not is_transient(e):
                raise
            if attempt == policy.attempts:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RegistryError(f"MLflow {what}: failed {attempt} times over {time.monotonic() - started:.0f} s; "
                                    f"last error: {first_line}") from e
            pause = policy.delay(attempt)
            _retries += 1
            log.warning("MLflow %s failed (%s); retry %d/%d in %.1f s", what, type(e).__name__, attempt,
                        policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")
