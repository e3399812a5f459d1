"""Load: 16 trial processes log 10 checkpoints each at once to one real `mlflow server`, on SQLite and PostgreSQL.

Each trial is a separate Python process (as Ray workers are) that logs through `registry.log_checkpoint`
to its own run. They all start logging at the same moment (a start file), so the server sees 16 clients
at once. Afterwards every one of the 160 records must be there exactly once, READY, with its metrics, and
every downloaded model.safetensors must match the sha256 that the trial computed when it saved it.

Figures (time, errors, retries, records, server-side 'database is locked' lines) are printed and written to
test-artifacts/load-<store>.json.

PostgreSQL: $ICH_TEST_POSTGRES_URI (e.g. postgresql://ich:ich@127.0.0.1:5432/ich, see .ci/postgres.sh);
unset, the test runs .ci/postgres.sh itself when it can (root with apt, or PostgreSQL installed). Every
run gets a fresh database (ich_load_<random>), dropped afterwards, so reruns never collide.

Run one trial process by hand: python -m tests.test_load worker URI EXPERIMENT TRIAL WORKDIR GO_FILE OUT_JSON
(the test forks all 16 from one that imported torch and mlflow once: `workers URI EXPERIMENT N WORKDIR GO_FILE
OUT_DIR`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
TRIALS = 16
EPOCHS = 10
SWEEP = "load"
START_TIMEOUT_S = 180  # every worker imported mlflow/torch and wrote its checkpoints
RUN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------- worker

def _state(trial: int, epoch: int):
    """~280 KB of float32 weights plus an int buffer, different for every (trial, epoch)."""
    import torch
    gen = torch.Generator().manual_seed(1000 * trial + epoch)
    return {"stem.weight": torch.randn(64, 3, 3, 3, generator=gen),
            "blocks.0.fc.weight": torch.randn(64, 1024, generator=gen),
            "head.weight": torch.randn(10, 64, generator=gen), "head.bias": torch.zeros(10),
            "stem.bn.num_batches_tracked": torch.tensor(epoch, dtype=torch.int64)}


def worker(uri: str, experiment_id: str, trial_index: int, workdir: str, go_file: str, out_json: str) -> int:
    """One trial: save 10 checkpoints, wait for the start signal, log them all; write what happened."""
    import logging

    from mlflow import MlflowClient

    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from soups.store import registry, retry

    retries: list[str] = []

    class CountRetries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            retries.append(record.getMessage()[:300])

    logging.getLogger("soups.store.retry").addHandler(CountRetries(level=logging.WARNING))
    trial = f"trial_{trial_index:05d}"
    classes = [f"class_{i}" for i in range(10)]
    ckpts = []
    for epoch in range(1, EPOCHS + 1):
        meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=10, class_names=classes,
                              dataset_fingerprint="ds-load", init_fingerprint="init-load", epoch=epoch,
                              metrics={"val_accuracy": 0.5 + epoch / 40, "val_macro_f1": 0.4 + epoch / 40},
                              extra={"sweep": SWEEP, "trial": trial})
        folder = Path(workdir) / trial / f"epoch_{epoch:03d}"
        ckpts.append((epoch, folder, save_checkpoint(folder, _state(trial_index, epoch), meta), meta.metrics))
    client = MlflowClient(tracking_uri=uri)
    run_id = retry.call_with_retry("create run", client.create_run, experiment_id, run_name=trial,
                                      tags={registry.TAG_TRIAL: trial, "ich.kind": "trial", "ich.sweep": SWEEP}).info.run_id
    Path(out_json + ".ready").write_text("ready")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        time.sleep(0.02)

    logged, errors = [], []
    t0 = time.monotonic()
    for epoch, folder, sha, metrics in ckpts:
        t = time.monotonic()
        try:
            model_id = registry.log_checkpoint(client, (experiment_id, run_id), folder)
            logged.append({"epoch": epoch, "model_id": model_id, "sha256": sha, "seconds": time.monotonic() - t})
        except Exception as e:  # counted, never hidden: the test fails on any
            errors.append({"epoch": epoch, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]})
    Path(out_json).write_text(json.dumps({"trial": trial, "run_id": run_id, "logged": logged, "errors": errors,
                                          "retries": retries, "seconds": time.monotonic() - t0}))
    return 0


def spawn_workers(uri: str, experiment_id: str, trials: int, workdir: str, go_file: str, out_dir: str) -> int:
    """Start `trials` trial processes: what a worker needs is imported once here, then one child is forked per
    trial, each its own process with its own MLflow client and connections, as Ray's workers are (16 fresh
    interpreters importing torch and mlflow cost a minute of CPU on 2 cores). As soon as a child fails the
    others are killed and this exits 1."""
    import traceback

    import mlflow  # noqa: F401  (imported before the fork, by every child)
    import torch  # noqa: F401
    from ich.checkpoint import save_checkpoint  # noqa: F401
    from soups.store import registry  # noqa: F401

    sys.stdout.flush()
    children: dict[int, int] = {}
    for i in range(trials):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = worker(uri, experiment_id, i, workdir, go_file, str(Path(out_dir) / f"trial{i}.json"))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = i
    failed = 0
    while children:
        pid, status = os.wait()
        i = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            print(f"trial process {i} (pid {pid}) exited {code}; ending the others", flush=True)
            failed = 1
            for other in children:
                os.kill(other, signal.SIGKILL)
    return failed


# ---------------------------------------------------------------------------------------------- test side

def _postgres_uri() -> tuple[str | None, str]:
    """(DSN of a PostgreSQL the `ich` role can create databases on, or None, why not)."""
    uri = os.environ.get("ICH_TEST_POSTGRES_URI")
    if uri:
        return uri, "ICH_TEST_POSTGRES_URI"
    script = ROOT / ".ci" / "postgres.sh"
    can_install = os.geteuid() == 0 and shutil.which("apt-get")
    installed = shutil.which("psql") and (Path("/usr/lib/postgresql").is_dir() or shutil.which("pg_ctl"))
    if not (can_install or installed):
        return None, ("ICH_TEST_POSTGRES_URI is unset and .ci/postgres.sh cannot run here "
                      "(PostgreSQL is not installed and this is not root with apt-get)")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None, f".ci/postgres.sh failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return proc.stdout.strip().splitlines()[-1], ".ci/postgres.sh"


def _mlflow_store_uri(uri: str, name: str) -> str:
    """The DSN for MLflow's SQLAlchemy store, on database `name`, with an explicit psycopg2 driver.

    SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3), which this project does not install; the
    server then dies at start with "No module named 'psycopg'"."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(uri)
    scheme = "postgresql+psycopg2" if parts.scheme in ("postgresql", "postgres") else parts.scheme
    return urlunsplit(parts._replace(scheme=scheme, path="/" + name))


def _verify(client, experiment_id: str, results: list[dict], tmp: Path) -> dict:
    """Every (trial, epoch) once, READY, with metrics; downloaded weights match the trials' sha256."""
    from mlflow.entities import LoggedModelStatus

    from ich.checkpoint import sha256_file
    from soups.store.registry import download_checkpoint, search_checkpoints

    expected = {(r["trial"], x["epoch"]): x["sha256"] for r in results for x in r["logged"]}
    records = search_checkpoints(client, [experiment_id], sweep=SWEEP)
    # Without the registry's de-duplication too: two READY models of one key would be a double record.
    raw, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], filter_string="tags.`ich.kind` = 'checkpoint'",
                                           max_results=500, page_token=token)
        raw += [m for m in page if m.status == LoggedModelStatus.READY]
        token = page.token
        if not token:
            break
    doubles = {k: n for k, n in Counter((m.tags["ich.trial"], m.tags["ich.epoch"]) for m in raw).items() if n > 1}
    keys = Counter((r.trial, r.epoch) for r in records)
    missing = sorted(set(expected) - set(keys))
    wrong_sha = [(r.trial, r.epoch) for r in records if expected.get((r.trial, r.epoch)) != r.sha256]
    no_metrics = [(r.trial, r.epoch) for r in records if not {"val_accuracy", "val_macro_f1"} <= set(r.metrics)]

    def pull(record) -> bool:
        folder = download_checkpoint(client, record, tmp / "pull")  # raises on a sha256 mismatch
        return sha256_file(folder / "model.safetensors") == expected[(record.trial, record.epoch)]

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        downloads = list(pool.map(pull, records))
    return {"records": len(records), "raw_ready": len(raw), "doubles": doubles, "missing": missing,
            "wrong_sha": wrong_sha, "no_metrics": no_metrics, "downloaded": len(downloads),
            "download_mismatch": downloads.count(False), "download_s": round(time.monotonic() - t0, 2)}


def run_load(store: str, backend_store_uri: str | None, tmp: Path) -> dict:
    """Start a fresh server on the store, run 16 trial processes at once, verify; returns the figures."""
    from mlflow import MlflowClient

    from soups.store import registry
    from soups.tracking_server import free_port, start_server

    t_server = time.monotonic()
    handle = start_server(tmp / "server", port=free_port(), backend_store_uri=backend_store_uri)
    server_start_s = time.monotonic() - t_server
    spawner = None
    log = tmp / "workers.log"
    try:
        client = MlflowClient(tracking_uri=handle.uri)
        experiment_id = registry.get_or_create_experiment(client, f"load-{store}-{uuid.uuid4().hex[:6]}")
        go = tmp / "GO"
        env = {**os.environ, "MLFLOW_TRACKING_URI": handle.uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        outs = [tmp / f"trial{i}.json" for i in range(TRIALS)]  # as spawn_workers names them
        cmd = [sys.executable, "-m", "tests.test_load", "workers", handle.uri, experiment_id, str(TRIALS),
               str(tmp / "ckpts"), str(go), str(tmp)]
        with open(log, "w") as out:  # a file, not a pipe: 16 writers never block on a full pipe nobody reads
            spawner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its group: the spawner and its 16 trials
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(Path(str(o) + ".ready").exists() for o in outs):
            assert spawner.poll() is None, f"a trial process died before the start: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "trial processes did not get ready in time"
            time.sleep(0.1)
        t0 = time.monotonic()
        go.write_text("go")
        spawner.wait(timeout=RUN_TIMEOUT_S)
        wall_s = time.monotonic() - t0
        assert spawner.returncode == 0, f"trial processes failed:\n{log.read_text()[-2000:]}"
        results = [json.loads(o.read_text()) for o in outs]
        check = _verify(client, experiment_id, results, tmp)
    finally:
        if spawner is not None and spawner.poll() is None:  # an ended spawner has reaped all its trials
            os.killpg(spawner.pid, signal.SIGKILL)  # the spawner and its trials: the group it leads
            spawner.wait()
        handle.stop()
    server_log = handle.log_path.read_text(errors="replace")
    per_call = sorted(x["seconds"] for r in results for x in r["logged"])
    figures = {
        "store": store, "trials": TRIALS, "epochs": EPOCHS, "wall_s": round(wall_s, 2),
        "checkpoints_per_s": round(len(per_call) / wall_s, 1),
        "log_checkpoint_s": {"median": round(per_call[len(per_call) // 2], 3) if per_call else None,
                             "p95": round(per_call[int(len(per_call) * 0.95)], 3) if per_call else None,
                             "max": round(per_call[-1], 3) if per_call else None},
        "errors": sum(len(r["errors"]) for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:5],
        "retries": sum(len(r["retries"]) for r in results),
        "retry_samples": [x for r in results for x in r["retries"]][:5],
        "server_database_locked_lines": server_log.count("database is locked"),
        "server_status_counts": dict(sorted(Counter(re.findall(r'HTTP/[\d.]+" (\d{3}) ', server_log)).items())),
        "server_start_s": round(server_start_s, 1),
        **check,
    }
    return figures


def _report(figures: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"load-{figures['store']}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nload[{figures['store']}]: {figures['trials']}x{figures['epochs']} checkpoints in {figures['wall_s']} s "
          f"({figures['checkpoints_per_s']}/s), errors {figures['errors']}, retries {figures['retries']}, "
          f"records {figures['records']} (raw READY {figures['raw_ready']}), downloads verified "
          f"{figures['downloaded'] - figures['download_mismatch']}/{figures['downloaded']}, "
          f"'database is locked' in server log: {figures['server_database_locked_lines']}, "
          f"HTTP statuses {figures['server_status_counts']}, "
          f"log_checkpoint s median/p95/max {figures['log_checkpoint_s']}", flush=True)


def _assert_clean(f: dict) -> None:
    n = TRIALS * EPOCHS
    assert f["errors"] == 0, f"{f['errors']} log_checkpoint errors, e.g. {f['error_samples']}"
    assert f["records"] == n and f["raw_ready"] == n, f"{f['records']} records, {f['raw_ready']} READY models, want {n}"
    assert not f["doubles"] and not f["missing"], f"doubles {f['doubles']}, missing {f['missing'][:5]}"
    assert not f["wrong_sha"] and not f["no_metrics"], f"sha {f['wrong_sha'][:5]}, metrics {f['no_metrics'][:5]}"
    assert f["downloaded"] == n and f["download_mismatch"] == 0


pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_load_sqlite(tmp_path):
    figures = run_load("sqlite", None, tmp_path)
    _report(figures)
    _assert_clean(figures)


def test_load_postgresql(tmp_path):
    from tests.conftest import require_service
    try:
        import psycopg2
        from psycopg2 import sql
    except ImportError:
        require_service("psycopg2 is needed for a PostgreSQL tracking store: pip install -e '.[dev]'")

    base, source = _postgres_uri()
    if base is None:
        require_service(source)
    name = f"ich_load_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(base, connect_timeout=10)
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL from {source} ({base.split('@')[-1]}) does not answer: {str(e).strip()}")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        figures = run_load("postgresql", _mlflow_store_uri(base, name), tmp_path)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()
    _report(figures)
    _assert_clean(figures)


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "worker":
    sys.exit(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]))
if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "workers":
    sys.exit(spawn_workers(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]))
