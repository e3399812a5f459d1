"""Model factory: the registered tiny models, init weights from local checkpoints, refusals."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ich.checkpoint import CheckpointMeta, save_checkpoint
from ich.models import (COATNETS, BASELINES, ModelError, count_parameters, create_model, family, load_init_weights,
                        random_init_fingerprint)

TINY = ("coatnet_tiny_ich", "resnet_tiny_ich", "densenet_tiny_ich", "vit_tiny_ich")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [10, 17])
def test_tiny_models_build_and_run_at_32px(name, num_classes):
    model = create_model(name, num_classes, 32)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == num_classes
    assert count_parameters(model) < 500_000  # CPU scale
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, num_classes) and torch.isfinite(out).all()
    # The classifier named in the pretrained cfg (used to skip heads on init) really is the head.
    cls_name = model.pretrained_cfg["classifier"]
    assert model.get_submodule(cls_name) is head


def test_tiny_coatnet_is_a_c_c_t_t_maxxvit_of_about_a_quarter_million_parameters():
    model = create_model("coatnet_tiny_ich", 10, 32)
    kinds = [{type(b).__name__ for b in stage.blocks} for stage in model.stages]
    assert kinds == [{"MbConvBlock"}, {"MbConvBlock"}, {"TransformerBlock2d"}, {"TransformerBlock2d"}]
    assert 200_000 <= count_parameters(model) <= 300_000
    assert model.num_features == 128
    # Two runs with the same seed get the same random init (what lets random-init trials be souped).
    torch.manual_seed(3)
    a = create_model("coatnet_tiny_ich", 10, 32).state_dict()
    torch.manual_seed(3)
    b = create_model("coatnet_tiny_ich", 10, 32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert random_init_fingerprint("coatnet_tiny_ich", 10, 32, 0) != random_init_fingerprint("coatnet_tiny_ich", 10, 32, 1)


def test_every_registered_tiny_model_is_covered():
    import timm

    assert set(timm.list_models("*_ich")) == set(TINY)


def test_unknown_model_is_named():
    with pytest.raises(ModelError, match="unknown model 'coatnet_huge_typo'"):
        create_model("coatnet_huge_typo", 17)


def test_hub_tag_of_another_model_is_refused_before_any_download():
    with pytest.raises(ModelError, match="not a pretrained tag of model 'coatnet_0_rw_224'"):
        create_model("coatnet_0_rw_224", 17, hub_tag="coatnet_2_rw_224.sw_in12k_ft_in1k")


def test_families():
    assert {family(n) for n in COATNETS} == {"coatnet"}
    assert [family(n) for n in ("resnet50", "densenet121", "vit_base_patch16_224", "resnet_tiny_ich")] == \
        ["resnet", "densenet", "vit", "resnet"]
    assert set(TINY) <= set(COATNETS + BASELINES)


def _save_source(tmp_path, name="coatnet_tiny_ich", num_classes=10):
    torch.manual_seed(42)
    src = create_model(name, num_classes, 32)
    state = src.state_dict()
    meta = CheckpointMeta(architecture=name, img_size=32, num_classes=num_classes,
                          class_names=[str(i) for i in range(num_classes)], dataset_fingerprint="x" * 64,
                          init_fingerprint="random:0", epoch=1)
    digest = save_checkpoint(tmp_path / "src", state, meta)
    return state, digest


def test_init_weights_keep_backbone_and_leave_a_new_head_fresh(tmp_path):
    src_state, digest = _save_source(tmp_path)
    torch.manual_seed(7)
    model = create_model("coatnet_tiny_ich", 17, 32)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint, skipped = load_init_weights(model, str(tmp_path / "src"))
    assert fingerprint == digest
    assert skipped == ["head.fc.bias", "head.fc.weight"]
    after = model.state_dict()
    for k, v in after.items():
        if k in skipped:
            assert torch.equal(v, fresh[k]), k  # fresh 17-class head, untouched
        else:
            assert torch.equal(v, src_state[k]), k  # backbone from the source
    changed = [k for k in after if k not in skipped and not torch.equal(fresh[k], src_state[k])]
    assert len(changed) > 20  # the load really replaced the (different) random backbone

    # The same weights as a bare .safetensors file, into a model with the same head: everything loads.
    model10 = create_model("coatnet_tiny_ich", 10, 32)
    fp10, skipped10 = load_init_weights(model10, str(tmp_path / "src" / "model.safetensors"))
    assert fp10 == digest and skipped10 == []
    assert all(torch.equal(model10.state_dict()[k], src_state[k]) for k in src_state)
    model10.eval()
    with torch.no_grad():
        assert model10(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_init_weights_of_another_architecture_are_refused(tmp_path):
    _save_source(tmp_path, name="resnet_tiny_ich")
    model = create_model("coatnet_tiny_ich", 17, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="do not fit MaxxVit"):
        load_init_weights(model, str(tmp_path / "src"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched


def test_init_weights_with_a_wrong_backbone_shape_are_refused(tmp_path):
    state = create_model("coatnet_tiny_ich", 10, 32).state_dict()
    key = "stem.conv1.weight"
    state[key] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match=r"stem\.conv1\.weight has shape"):
        load_init_weights(create_model("coatnet_tiny_ich", 10, 32), str(tmp_path / "w.safetensors"))


def test_missing_or_pickled_init_weights_are_refused(tmp_path):
    model = create_model("coatnet_tiny_ich", 10, 32)
    with pytest.raises(ModelError, match="no such file"):
        load_init_weights(model, str(tmp_path / "nothing.safetensors"))
    torch.save(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_init_weights(model, str(tmp_path))


def test_coatnet_0_builds_offline_with_a_17_class_head():
    model = create_model("coatnet_0_rw_224", 17)
    assert model.get_classifier().out_features == 17
    assert 25e6 < count_parameters(model) < 29e6
