"""A named init (a weights file here; a hub tag or an MLflow URI go the same way) is in MLflow as the sweep's
`init` LoggedModel (issue 21 item 1): logged once per fingerprint with the exact weights the trials start from,
found again by that fingerprint (never logged twice), and it is what Model Stock's anchor search returns for
checkpoints carrying that init fingerprint. Real `mlflow server`; the weights are compared bit for bit."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from soups import registry
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
