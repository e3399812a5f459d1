"""The checkpoint upload process of a trial worker: registry.log_checkpoint off the training process's GIL.

The trial (sweeps/trainable.py) writes one JSON request per line to this process's stdin; it answers one JSON
line per request on stdout, in order: {"model_id": ..., "retries": n} or {"error": "...", "retries": n}, where
retries counts the MLflow calls that failed and were tried again. It exits when stdin closes (its worker
ended or died).

A plain subprocess with two pipes, not a multiprocessing pool: a spawned pool's queues are named semaphores
held by multiprocessing's resource tracker, a child of the Ray worker that the raylet kills when the worker
exits, before Python's exit hooks release the semaphores; the tracker started again then failed on every name
it never saw (`resource_tracker: process died unexpectedly`, `KeyError: '/mp-…'`) at the end of every trial
worker. Pipes need no tracker, and a killed upload process leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class UploadError(RuntimeError):
    """A checkpoint upload that failed for good (its message is the upload process's one-line error)."""


class Upload:
    """One request in flight; the answers come back in request order, one at a time."""

    def __init__(self, process: "UploadProcess"):
        self._process = process
        self._answer: dict | None = None

    def done(self) -> bool:
        return self._answer is not None or self._process.readable()

    def result(self) -> str:
        """The model id (blocks until the answer is in); UploadError when the upload failed."""
        if self._answer is None:
            self._answer = self._process.read_answer()
            self._process.retries += int(self._answer.get("retries", 0))
        if "error" in self._answer:
            raise UploadError(self._answer["error"])
        return self._answer["model_id"]

    def wait(self) -> None:
        """Let the upload finish, whatever its outcome (a failing trial's last checkpoint may be reported on retry)."""
        try:
            self.result()
        except UploadError:
            pass


class UploadProcess:
    """`python -m sweeps.uploader`, kept across the trials a reused actor runs (it imports torch and MLflow once)."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # stderr is the worker's: the upload process's retry warnings show up in the trial's log.
        self._proc = subprocess.Popen([sys.executable, "-m", "sweeps.uploader"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
        self._buffer = b""
        self.retries = 0  # MLflow calls the upload process retried, over the answers read so far

    def alive(self) -> bool:
        return self._proc.poll() is None

    def submit(self, tracking_uri: str, **kwargs) -> Upload:
        request = {"tracking_uri": tracking_uri, "kwargs": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in kwargs.items()}}
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        return Upload(self)

    def readable(self) -> bool:
        return b"\n" in self._buffer or bool(select.select([self._proc.stdout.fileno()], [], [], 0)[0])

    def read_answer(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = os.read(self._proc.stdout.fileno(), 65536)
            if not chunk:
                code = self._proc.wait()
                raise UploadError(f"the checkpoint upload process exited (code {code}) before answering")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


def main() -> int:
    # Ctrl-C reaches the whole process group: the trial handles it; this process ends when its stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints never mixes with the answers
    from mlflow import MlflowClient

    from soups.store import registry, retry
    clients: dict[str, MlflowClient] = {}
    for line in sys.stdin.buffer:
        request = json.loads(line)
        before = retry.retry_count()
        try:
            client = clients.setdefault(request["tracking_uri"], MlflowClient(request["tracking_uri"]))
            answer = {"model_id": registry.log_checkpoint(client, **request["kwargs"])}
        except Exception as e:  # the trial raises it (one line) and Tune retries the trial
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            answer = {"error": f"{type(e).__name__}: {first}"}
        answer["retries"] = retry.retry_count() - before
        try:
            answers.write(json.dumps(answer).encode() + b"\n")
        except BrokenPipeError:  # the worker is gone: nobody waits for the answer
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
