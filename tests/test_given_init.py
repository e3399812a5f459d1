"""A named init (a weights file here; a hub tag or an MLflow URI go the same way) is in MLflow as the sweep's
`init` LoggedModel (issue 21 item 1): logged once per fingerprint with the exact weights the trials start from,
found again by that fingerprint (never logged twice), and it is what Model Stock's anchor search returns for
checkpoints carrying that init fingerprint. Real `mlflow server`; the weights are compared bit for bit."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from soups.store import registry
from tests.test_preprocess import write_pretrained


@pytest.mark.integration
def test_a_file_init_is_logged_once_and_found_by_its_fingerprint(mlflow_server, digits_data, tmp_path):
    from sweeps.config import load_config
    from sweeps.init_weights import given_init, record_given_init
    client = MlflowClient(mlflow_server)
    eid = registry.get_or_create_experiment(client, "given-init")
    parent = client.create_run(eid, run_name="given-init").info.run_id
    weights = write_pretrained(tmp_path / "pre")
    path = tmp_path / "sweep.yaml"
    path.write_text(f"train: {{model: coatnet_tiny_ich, img_size: 32}}\ninit: {{weights: {weights}}}\n")
    cfg = load_config(path)
    init = given_init(cfg, "coatnet_tiny_ich", cfg.init.weights, digits_data)
    assert init.model_id is None and registry.search_init_by_fingerprint(client, [eid], init.fingerprint) == []

    record_given_init(init, cfg, "coatnet_tiny_ich", digits_data, client, eid, parent, "given-init")
    found = registry.search_init_by_fingerprint(client, [eid], init.fingerprint)
    assert [r.model_id for r in found] == [init.model_id]
    assert found[0].init_fingerprint == init.fingerprint and found[0].tags["ich.kind"] == "init"
    anchor, meta = registry.load_record(client, found[0], tmp_path / "pulled")  # verified: sha256, tags vs meta
    assert meta.init_fingerprint == init.fingerprint
    assert set(anchor) == set(init.state_dict) and all(torch.equal(anchor[k], init.state_dict[k]) for k in anchor)

    again = given_init(cfg, "coatnet_tiny_ich", cfg.init.weights, digits_data)  # a later sweep: the same init
    record_given_init(again, cfg, "coatnet_tiny_ich", digits_data, client, eid, parent, "given-init")
    assert again.model_id == init.model_id  # found, not logged twice
    inits = client.search_logged_models([eid], filter_string="tags.`ich.kind` = 'init'")
    assert len(inits) == 1
    assert registry.search_init_by_fingerprint(client, [eid], "f" * 64) == []  # another fingerprint: not this one


@pytest.mark.integration
def test_an_mlflow_init_is_used_only_when_its_signature_verifies(mlflow_server, digits_data, tmp_path, monkeypatch):
    """`init.weights: models:/m-…`: the signed init model is used; a forged copy (other weights, ich.sha256
    re-pinned, the genuine signature tags copied) is refused in one line (control: the download the code did
    before accepts it); a runs:/ URI, which no signature covers, is refused in one line."""
    import hashlib
    import shutil

    import mlflow.artifacts
    from mlflow.entities import LoggedModelStatus
    from safetensors.torch import load_file, save_file

    from ich.models import ModelError, resolve_init_weights
    from sweeps.config import load_config
    from sweeps.init_weights import given_init, record_given_init, resolve_init_source
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    eid = registry.get_or_create_experiment(client, "given-init-signed")
    parent = client.create_run(eid, run_name="given-init-signed").info.run_id
    path = tmp_path / "sweep.yaml"
    path.write_text(f"train: {{model: coatnet_tiny_ich, img_size: 32}}\n"
                    f"init: {{weights: {write_pretrained(tmp_path / 'pre')}}}\n")
    cfg = load_config(path)
    init = given_init(cfg, "coatnet_tiny_ich", cfg.init.weights, digits_data)
    record_given_init(init, cfg, "coatnet_tiny_ich", digits_data, client, eid, parent, "given-init-signed")

    got = resolve_init_source(f"models:/{init.model_id}", tmp_path / "ok")  # signed by this machine's key
    weights = load_file(str(got))
    assert all(torch.equal(weights[k], init.state_dict[k]) for k in init.state_dict)

    genuine = client.get_logged_model(init.model_id)
    folder = tmp_path / "forged"
    shutil.copytree(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{init.model_id}",
                                                        dst_path=str(tmp_path / "dl")), folder)
    name = got.name
    planted = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in load_file(str(folder / name)).items()}
    save_file(planted, str(folder / name))
    tags = dict(genuine.tags)
    tags["ich.sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()  # re-pinned, signature copied
    forged = client.create_logged_model(experiment_id=eid, name="forged-init", tags=tags, model_type="init")
    client.log_model_artifacts(forged.model_id, str(folder))
    client.finalize_logged_model(forged.model_id, LoggedModelStatus.READY)

    before = resolve_init_weights(mlflow.artifacts.download_artifacts(  # control: the code before this check
        artifact_uri=f"models:/{forged.model_id}", dst_path=str(tmp_path / "ctl")))
    assert torch.equal(load_file(str(before))[next(iter(planted))], next(iter(planted.values())))
    with pytest.raises(ModelError) as e:
        resolve_init_source(f"models:/{forged.model_id}", tmp_path / "refused")
    assert "\n" not in str(e.value) and forged.model_id in str(e.value) and "signature does not match" in str(e.value)
    with pytest.raises(ModelError, match=r"^init weights runs:/abc/model: .*no signature covers"):
        resolve_init_source("runs:/abc/model", tmp_path / "runs")
