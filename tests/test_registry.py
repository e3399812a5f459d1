"""The MLflow registry adapter and the local server lifecycle, against real `mlflow server` processes."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from ich.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from soups.store import registry, retry
from soups.store.registry import log_checkpoint, search_checkpoints
from soups.store.retry import RetryPolicy, call_with_retry
from soups import tracking_server as mlflow_server

CLASSES = ["Đờn ca tài tử", "Lễ hội Ok Om Bok"]


def make_checkpoint(folder: Path, trial: str, epoch: int, seed: int, sweep: str = "sweep-a",
                    **extra) -> tuple[Path, str, dict]:
    """A small (~0.3 MB) random checkpoint with a BatchNorm-like int64 buffer; its checkpoint.json names its sweep
    and trial (what log_checkpoint tags it with)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"stem.weight": torch.randn(64, 3, 3, 3, generator=gen), "head.weight": torch.randn(2, 1024, generator=gen),
             "blocks.0.fc.weight": torch.randn(64, 1024, generator=gen),
             "stem.bn.num_batches_tracked": torch.tensor(epoch * 10, dtype=torch.int64)}
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=2, class_names=CLASSES,
                          dataset_fingerprint="ds-1", init_fingerprint="init-1", epoch=epoch,
                          metrics={"val_accuracy": 0.5 + epoch / 10, "val_macro_f1": 0.4 + epoch / 20},
                          extra={"sweep": sweep, "trial": trial, **extra})
    ckpt_dir = folder / f"{trial}-e{epoch}-s{seed}"
    return ckpt_dir, save_checkpoint(ckpt_dir, state, meta), state


def log(client, experiment_id, run_id, ckpt_dir, retry=None) -> str:
    return log_checkpoint(client, (experiment_id, run_id), ckpt_dir, retry=retry)


@pytest.fixture
def experiment(mlflow_client) -> str:
    return registry.get_or_create_experiment(mlflow_client, f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def logged_sweep(mlflow_client, experiment, tmp_path):
    """Two trials x three epochs logged; returns {(trial, epoch): (model_id, sha, state, ckpt_dir, run_id)}."""
    logged = {}
    for t, trial in enumerate(["trial_00000", "trial_00001"]):
        run_id = mlflow_client.create_run(experiment, tags={registry.TAG_TRIAL: trial}).info.run_id
        for epoch in range(3):
            ckpt_dir, sha, state = make_checkpoint(tmp_path, trial, epoch, seed=10 * t + epoch)
            model_id = log(mlflow_client, experiment, run_id, ckpt_dir)
            logged[(trial, epoch)] = (model_id, sha, state, ckpt_dir, run_id)
    return logged


# ------------------------------------------------------------------------------------------ no server


def test_retry_policy_waits_at_least_30_seconds_in_total():
    policy = RetryPolicy()
    waits = [policy.delay(a) for a in range(1, policy.attempts)]
    assert sum(waits) >= 30 and max(waits) <= policy.max_s


def test_call_with_retry_retries_connection_errors_only():
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(retry.RegistryError, match="flaky call: failed 3 times"):
        call_with_retry("flaky call", refused, retry=RetryPolicy(attempts=3, base_s=0.01))
    assert len(calls) == 3

    def bad_argument():
        calls.append(1)
        raise ValueError("bad argument")

    calls.clear()
    with pytest.raises(ValueError):
        call_with_retry("bad call", bad_argument, retry=RetryPolicy(attempts=3, base_s=0.01))
    assert len(calls) == 1


def test_an_overloaded_server_is_retried_and_a_bad_request_is_not():
    """MLflow answers an exhausted database pool as 400 BAD_REQUEST (seen in the load test): that is retried;
    a 400 about the request itself is not (the control)."""
    from mlflow.exceptions import RestException

    def rest(message):
        return RestException({"error_code": "BAD_REQUEST", "message": message})

    overloaded = rest("(sqlalchemy.exc.TimeoutError) QueuePool limit of size 5 overflow 10 reached, "
                      "connection timed out, timeout 30.00")
    assert overloaded.get_http_status_code() == 400
    assert retry.is_transient(overloaded)
    assert retry.is_transient(rest("(sqlite3.OperationalError) database is locked"))
    # two trials logging the same new dataset at once (seen in a CI run): the loser's retry finds the row
    assert retry.is_transient(rest("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                      "datasets.name, datasets.digest"))
    assert not retry.is_transient(rest("(sqlite3.IntegrityError) UNIQUE constraint failed: runs.run_uuid"))
    assert not retry.is_transient(rest("Invalid value 'x' for parameter 'max_results'"))


def test_quotes_in_tag_values_are_refused():
    with pytest.raises(ValueError, match="ich.trial"):
        registry._tag_filter({registry.TAG_TRIAL: "it's"})


# ------------------------------------------------------------------------------------------ real server


@pytest.mark.integration
def test_search_returns_one_record_per_trial_epoch_with_metrics(mlflow_client, experiment, logged_sweep):
    records = search_checkpoints(mlflow_client, [experiment])
    assert [(r.trial, r.epoch) for r in records] == sorted(logged_sweep)
    for r in records:
        model_id, sha, _, _, run_id = logged_sweep[(r.trial, r.epoch)]
        assert (r.model_id, r.sha256, r.run_id, r.sweep) == (model_id, sha, run_id, "sweep-a")
        assert r.metrics == pytest.approx({"val_accuracy": 0.5 + r.epoch / 10, "val_macro_f1": 0.4 + r.epoch / 20})
        assert (r.architecture, r.dataset_fingerprint, r.init_fingerprint) == ("coatnet_tiny_ich", "ds-1", "init-1")
    assert len(search_checkpoints(mlflow_client, [experiment], trial="trial_00001")) == 3
    assert search_checkpoints(mlflow_client, [experiment], sweep="another-sweep") == []
    # The metrics also reach the trial's run, at step = epoch.
    history = mlflow_client.get_metric_history(logged_sweep[("trial_00000", 0)][4], "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]


@pytest.mark.integration
def test_relogging_the_same_epoch_adds_nothing(mlflow_client, experiment, logged_sweep):
    model_id, sha, _, ckpt_dir, run_id = logged_sweep[("trial_00001", 2)]
    assert log(mlflow_client, experiment, run_id, ckpt_dir) == model_id
    assert len(search_checkpoints(mlflow_client, [experiment])) == 6
    assert len(mlflow_client.search_logged_models([experiment])) == 6


@pytest.mark.integration
def test_crash_leftover_and_retrained_epoch_leave_exactly_one_ready_record(mlflow_client, experiment, logged_sweep,
                                                                           tmp_path):
    model_id, sha, _, ckpt_dir, run_id = logged_sweep[("trial_00000", 1)]
    # A crash between create and finalize left a PENDING record of the same epoch.
    stale = mlflow_client.create_logged_model(experiment, name="trial_00000-e001", source_run_id=run_id,
                                              tags={registry.TAG_KIND: "checkpoint", registry.TAG_SWEEP: "sweep-a",
                                                    registry.TAG_TRIAL: "trial_00000", registry.TAG_EPOCH: "1",
                                                    registry.TAG_SHA256: sha})
    assert len(search_checkpoints(mlflow_client, [experiment])) == 6  # searches ignore it
    # The resumed trial trains epoch 1 again and gets other weights: the new record replaces both.
    new_dir, new_sha, _ = make_checkpoint(tmp_path, "trial_00000", 1, seed=99)
    new_id = log(mlflow_client, experiment, run_id, new_dir)
    assert new_id not in (model_id, stale.model_id)
    records = {(r.trial, r.epoch): r for r in search_checkpoints(mlflow_client, [experiment])}
    assert len(records) == 6 and records[("trial_00000", 1)].model_id == new_id
    for old in (model_id, stale.model_id):
        model = mlflow_client.get_logged_model(old)
        assert model.status == LoggedModelStatus.FAILED and model.tags[registry.TAG_SUPERSEDED_BY] == new_id


@pytest.mark.integration
def test_download_and_load_round_trip(mlflow_client, experiment, logged_sweep, tmp_path):
    for record in search_checkpoints(mlflow_client, [experiment], trial="trial_00001"):
        state, meta = registry.load_record(mlflow_client, record, tmp_path / "pulled")
        expected = logged_sweep[(record.trial, record.epoch)][2]
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert state["stem.bn.num_batches_tracked"].dtype == torch.int64
        assert (meta.epoch, meta.class_names) == (record.epoch, CLASSES)


@pytest.mark.integration
def test_altered_artifact_on_the_server_is_refused(mlflow_client, mlflow_server_handle, experiment, logged_sweep,
                                                   tmp_path):
    record = search_checkpoints(mlflow_client, [experiment], trial="trial_00000")[2]
    artifacts = mlflow_server_handle.data_dir / "mlflow" / "artifacts"
    stored = next(artifacts.rglob(f"{record.model_id}/**/model.safetensors"))
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last weight byte: still valid safetensors, other weights
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch") as error:
        registry.load_record(mlflow_client, record, tmp_path / "pulled")
    assert all(part in str(error.value) for part in ("trial_00000", "epoch 2", record.model_id))


@pytest.mark.integration
def test_soup_is_logged_once_per_name(mlflow_client, experiment, tmp_path):
    run_id = mlflow_client.create_run(experiment).info.run_id
    ckpt_dir, sha, _ = make_checkpoint(tmp_path, "soup", 0, seed=5)
    tags = {registry.TAG_SWEEP: "sweep-a", registry.TAG_ARCHITECTURE: "coatnet_tiny_ich"}
    first = registry.log_soup_model(mlflow_client, experiment_id=experiment, run_id=run_id, ckpt_dir=ckpt_dir,
                                    name="greedy.f1", tags=tags, metrics={"val_accuracy": 0.8})
    again = registry.log_soup_model(mlflow_client, experiment_id=experiment, run_id=run_id, ckpt_dir=ckpt_dir,
                                    name="greedy.f1", tags=tags, metrics={"val_accuracy": 0.8})
    assert first == again
    model = mlflow_client.get_logged_model(first)
    assert model.status == LoggedModelStatus.READY
    assert (model.tags[registry.TAG_KIND], model.tags[registry.TAG_SHA256]) == ("soup", sha)
    assert search_checkpoints(mlflow_client, [experiment]) == []  # soups are not checkpoints


@pytest.mark.integration
def test_experiment_and_runs_are_found_again_on_resume(mlflow_client):
    name = f"resume-{uuid.uuid4().hex[:8]}"
    experiment = registry.get_or_create_experiment(mlflow_client, name)
    assert registry.get_or_create_experiment(mlflow_client, name) == experiment
    tags = {"ich.sweep": "sweep-a", "ich.role": "parent"}
    assert registry.find_run_by_tags(mlflow_client, experiment, tags) is None
    run = mlflow_client.create_run(experiment, tags=tags)
    mlflow_client.create_run(experiment, tags={"ich.sweep": "sweep-a", "ich.role": "trial"})
    assert registry.find_run_by_tags(mlflow_client, experiment, tags).info.run_id == run.info.run_id


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_log_checkpoint_survives_a_server_restart(tmp_path, caplog):
    data_dir, port = tmp_path / "restart", mlflow_server.free_port()
    server = mlflow_server.start_server(data_dir, port=port)
    try:
        client = MlflowClient(tracking_uri=server.uri)
        experiment = registry.get_or_create_experiment(client, "restart")
        run_id = client.create_run(experiment).info.run_id
        ckpt_dir, sha, _ = make_checkpoint(tmp_path, "trial_00000", 0, seed=1)
        server.stop()

        result: dict = {}

        def log_while_down():
            try:
                result["model_id"] = log(client, experiment, run_id, ckpt_dir)
            except BaseException as e:  # surfaced by the assertion below
                result["error"] = e

        started = time.monotonic()
        worker = threading.Thread(target=log_while_down)
        worker.start()
        time.sleep(3)
        assert worker.is_alive(), f"log_checkpoint gave up while the server was down: {result.get('error')}"
        server = mlflow_server.start_server(data_dir, port=port)
        worker.join(timeout=60)
        assert "error" not in result, result.get("error")
        assert time.monotonic() - started < 40
        assert any("retry" in r.getMessage() for r in caplog.records if r.name == "soups.store.retry")
        records = search_checkpoints(client, [experiment])
        assert [(r.model_id, r.sha256) for r in records] == [(result["model_id"], sha)]
    finally:
        server.stop()


@pytest.mark.integration
def test_ensure_tracking_uri_starts_then_reuses_the_local_server(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir = tmp_path / "ich-home"
    try:
        uri = mlflow_server.ensure_tracking_uri(data_dir)
        assert f"MLflow UI: {uri}" in capsys.readouterr().out
        record = mlflow_server._read_record(data_dir)
        assert record["uri"] == uri and mlflow_server.health_ok(uri)
        assert (data_dir / "mlflow" / "mlflow.db").is_file()

        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        assert mlflow_server.ensure_tracking_uri(data_dir, quiet=True) == uri
        assert mlflow_server._read_record(data_dir)["pid"] == record["pid"]
        assert capsys.readouterr().out == ""
        # A set MLFLOW_TRACKING_URI wins and starts nothing.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:1")
        assert mlflow_server.ensure_tracking_uri(tmp_path / "elsewhere") == "http://example.invalid:1"
        assert not (tmp_path / "elsewhere").exists()
    finally:
        assert mlflow_server.stop_local_server(data_dir)
    assert not mlflow_server.health_ok(uri)
    assert not (data_dir / "mlflow" / "server.json").exists()


@pytest.mark.integration
def test_init_model_is_found_under_the_new_recipe_tag_and_the_old_one(mlflow_client, experiment, tmp_path):
    """Init models logged before `ich.recipe` became `ich.warm_start_recipe` are still found (else an upgrade
    trains the sweep's warm start again); a model with another recipe under either name is not."""
    run_id = mlflow_client.create_run(experiment).info.run_id
    found = {}
    for name, recipe in (("new", "r-new"), ("old", "r-old"), ("other", "r-other")):
        ckpt_dir, _, _ = make_checkpoint(tmp_path, f"init-{name}", 0, seed=7, recipe=recipe)
        model_id = registry.log_init_model(mlflow_client, (experiment, run_id), ckpt_dir)
        if name != "new":  # as an older version tagged it
            mlflow_client.delete_logged_model_tag(model_id, registry.TAG_WARM_START_RECIPE)
            mlflow_client.set_logged_model_tags(model_id, {registry.LEGACY_TAG_WARM_START_RECIPE: recipe})
        found[name] = model_id

    def search(recipe):
        return [r.model_id for r in registry.search_init_models(
            mlflow_client, [experiment], sweep="sweep-a", architecture="coatnet_tiny_ich", dataset_fingerprint="ds-1",
            recipe=recipe)]
    assert search("r-new") == [found["new"]]
    assert search("r-old") == [found["old"]]
    assert search("r-missing") == []
