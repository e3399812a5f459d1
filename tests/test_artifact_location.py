"""A tracking server names where a model's files are; only its artifact proxy is believed (issue 23, finding 7: "a
malicious server can name any local folder (file:///usr) as an artifact location and the client copies it before
refusing"). With only the REST API, an experiment is created with artifact_location file:///<a local folder> and a
LoggedModel in it: MLflow's own download copies the planted local file (the control), the project's readers refuse
before touching it (pull, ich predict's resolver, ich gc's listing and deletion), in one line naming the model."""
from __future__ import annotations

import pytest

from soups.store.registry import ARTIFACT_SCHEMES_ENV, artifact_location_problem
from soups.store.retry import RegistryError

SERVER = "http://127.0.0.1:5000"


def test_only_the_servers_proxy_is_believed_under_a_server(monkeypatch):
    monkeypatch.delenv(ARTIFACT_SCHEMES_ENV, raising=False)
    assert artifact_location_problem("mlflow-artifacts:/1/models/m-1/artifacts", SERVER) is None
    assert artifact_location_problem("http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1", SERVER) is None
    for bad in ("file:///usr", "/usr", "http://10.0.0.9:5000/x", "s3://bucket/1/models/m-1"):
        assert "is not under the tracking server's artifact proxy" in artifact_location_problem(bad, SERVER), bad
    monkeypatch.setenv(ARTIFACT_SCHEMES_ENV, "s3, gs")  # the user's own object store, named by its scheme
    assert artifact_location_problem("s3://bucket/1/models/m-1", SERVER) is None
    assert artifact_location_problem("file:///usr", SERVER) is not None
    # a local store is the user's own files
    assert artifact_location_problem("file:///home/me/mlruns/1/models/m-1", "sqlite:////home/me/mlflow.db") is None


@pytest.fixture
def planted(mlflow_server, mlflow_client, tmp_path):
    """An experiment whose artifact location is a local folder of this machine, a LoggedModel in it with an ich
    checkpoint's tags, and a file planted where its artifacts would be."""
    victim = tmp_path / "victim"
    experiment_id = mlflow_client.create_experiment(f"file-location-{tmp_path.name}",
                                                    artifact_location=victim.as_uri())
    model = mlflow_client.create_logged_model(experiment_id=experiment_id, name="forged", tags={
        "ich.kind": "checkpoint", "ich.sweep": "s", "ich.trial": "t", "ich.epoch": "1", "ich.sha256": "0" * 64})
    location = model.artifact_location
    assert location.startswith("file://"), location
    folder = victim / location[len(victim.as_uri()):].lstrip("/")
    folder.mkdir(parents=True)
    (folder / "secret.txt").write_text("a local file the server pointed at")
    return {"model": model, "folder": folder, "location": location}


@pytest.mark.integration
def test_a_file_location_named_by_the_server_is_never_read_or_deleted(planted, mlflow_client, tmp_path):
    import mlflow.artifacts

    from soups.store import gc, registry
    from soups.serve.verify import UntrustedModel, resolve_model

    model_id = planted["model"].model_id
    # control: MLflow itself copies whatever local folder the server names
    copied = mlflow.artifacts.download_artifacts(artifact_uri=planted["location"], dst_path=str(tmp_path / "ctl"),
                                                 tracking_uri=mlflow_client.tracking_uri)
    assert (tmp_path / "ctl").exists() and any(p.name == "secret.txt" for p in (tmp_path / "ctl").rglob("*")), copied

    record = registry.get_model_record(mlflow_client, model_id)
    with pytest.raises(RegistryError) as e:
        registry.download_checkpoint(mlflow_client, record, tmp_path / "pull")
    line = str(e.value)
    assert "\n" not in line and model_id in line and "artifact proxy" in line, line
    assert not (tmp_path / "pull").exists() or not any((tmp_path / "pull").rglob("secret.txt"))

    with pytest.raises(UntrustedModel, match=r"is not under the tracking server's artifact proxy"):
        resolve_model(f"models:/{model_id}")

    with pytest.raises(RegistryError, match="ich gc: artifact location"):
        gc._artifact_files(mlflow_client, planted["location"])
    with pytest.raises(RegistryError, match="ich gc: artifact location"):
        gc._delete_files(mlflow_client, planted["location"], ["secret.txt"])
    assert (planted["folder"] / "secret.txt").is_file()  # nothing deleted
    # control: MLflow's repository for that location does delete a local file there
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    (planted["folder"] / "other.txt").write_text("x")
    get_artifact_repository(planted["location"], tracking_uri=mlflow_client.tracking_uri).delete_artifacts("other.txt")
    assert not (planted["folder"] / "other.txt").exists()
