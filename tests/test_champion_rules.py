"""When alias `champion` moves (soups/champion.py), case by case and deterministically (issue 25).

decide_champion reads plain things: the options (rule, metric, alpha), the dataset's fingerprint and val labels,
the new best soup's val figures, and the current champion version's tags. The test hands it exactly those,
built here; the champion's val figure comes from its `ich.val_<metric>` tag, so the 'better' rule needs no
MLflow. The 'significant' rule compares val predictions (McNemar's exact test): its pure part,
significant_decision, gets prediction arrays whose discordant counts, and so whose p-value, are set by
construction. Every expected outcome is written by hand.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from soups.store import registry
from soups.champion import decide_champion, significant_decision

FP = "fingerprint-of-this-dataset"


def ctx(metric: str = "accuracy", rule: str = "better", alpha: float = 0.05):
    y = np.arange(40) % 4
    dataset = SimpleNamespace(fingerprint=FP, classes=list("abcd"), num_classes=4,
                              splits={"val": SimpleNamespace(labels=y)})
    return SimpleNamespace(opts=SimpleNamespace(metric=metric, champion_rule=rule, alpha=alpha), dataset=dataset,
                           client=None)  # no client: a call to MLflow would fail the test


def soup(**val):
    return SimpleNamespace(val=val)


def champion(version: int = 3, dataset: str = FP, **val):
    tags = {registry.TAG_DATASET: dataset, **{f"ich.val_{k}": repr(v) for k, v in val.items()}}
    return SimpleNamespace(version=str(version), tags=tags, run_id=None)


def test_no_champion_yet_moves():
    d = decide_champion(ctx(), soup(accuracy=0.1), None, None)
    assert d["moved"] is True and d["reason"] == "no champion yet" and d["previous_version"] is None


@pytest.mark.parametrize("new, old, moved", [(0.91, 0.90, True), (0.90, 0.90, False), (0.89, 0.90, False)],
                         ids=["beaten", "tie", "worse"])
def test_better_rule_on_accuracy(new, old, moved):
    d = decide_champion(ctx("accuracy"), soup(accuracy=new), None, champion(accuracy=old))
    assert d["moved"] is moved
    assert d["champion_val"] == old and d["new_val"] == new and d["previous_version"] == "3"
    verb = "beats" if moved else "does not beat"
    assert d["reason"] == f"val accuracy {new:.4f} {verb} champion v3's {old:.4f}"


@pytest.mark.parametrize("new, old, moved", [(0.30, 0.35, True), (0.35, 0.35, False), (0.40, 0.35, False)],
                         ids=["lower-loss-moves", "tie", "higher-loss-kept"])
def test_better_rule_on_loss_lower_is_better(new, old, moved):
    d = decide_champion(ctx("loss"), soup(loss=new), None, champion(loss=old))
    assert d["moved"] is moved, d["reason"]
    assert ("does not beat" not in d["reason"]) is moved


def test_champion_of_another_dataset_is_kept_and_the_reason_says_so():
    """Documented in decide_champion: a champion on another dataset fingerprint is not comparable, so the alias
    stays (the new soup is still registered as a version, without the alias)."""
    d = decide_champion(ctx(), soup(accuracy=0.99), None, champion(dataset="another-fingerprint", accuracy=0.10))
    assert d["moved"] is False
    assert d["reason"] == "champion v3 is on another dataset; not comparable"
    # control: the same figures on this dataset do move it (the fingerprint alone kept it)
    assert decide_champion(ctx(), soup(accuracy=0.99), None, champion(accuracy=0.10))["moved"] is True


# ---------------------------------------------------------------------------------------------- significant

def predictions(n: int, both_right: int, only_new: int, only_champion: int):
    """Val labels and two prediction arrays over n images with the given discordant counts (b = only_new right,
    c = only_champion right); the rest of the images both get wrong."""
    y = np.zeros(n, np.int64)
    new, champ = np.ones(n, np.int64), np.ones(n, np.int64)  # 1 = wrong
    a, b, c = both_right, both_right + only_new, both_right + only_new + only_champion
    new[:a] = champ[:a] = 0
    new[a:b] = 0
    champ[b:c] = 0
    return y, new, champ


def test_significant_rule_moves_for_a_clearly_better_candidate():
    # 400 val images, 300 right for both; the new soup also gets 60 more right and loses none:
    # b=60, c=0, two-sided exact p = 2 * 0.5**60 (about 1.7e-18) < 0.05, and 360/400 > 300/400.
    y, new, champ = predictions(400, 300, 60, 0)
    d = significant_decision(y, new, champ, alpha=0.05)
    assert bool(d["moved"]) is True
    assert (d["mcnemar_b"], d["mcnemar_c"]) == (60, 0)
    assert d["p_value"] == pytest.approx(2 * 0.5 ** 60, rel=1e-9)
    assert (d["new_val_accuracy"], d["champion_val_accuracy"]) == (0.9, 0.75)


def test_significant_rule_keeps_a_marginally_better_candidate():
    # b=3, c=1: P(X <= 1 | n=4, 1/2) = 5/16, two-sided p = 10/16 = 0.625 >= 0.05, though 303/400 > 301/400.
    y, new, champ = predictions(400, 300, 3, 1)
    d = significant_decision(y, new, champ, alpha=0.05)
    assert not d["moved"]
    assert d["p_value"] == pytest.approx(0.625)
    assert d["new_val_accuracy"] > d["champion_val_accuracy"]
    # control: the same margin is significant at alpha 0.7 (the p-value, not the accuracy, kept it)
    assert significant_decision(y, new, champ, alpha=0.7)["moved"]


def test_significant_rule_keeps_a_significantly_worse_candidate():
    # b=0, c=60: p = 2 * 0.5**60 < 0.05, but the champion is the more accurate one.
    y, new, champ = predictions(400, 300, 0, 60)
    d = significant_decision(y, new, champ, alpha=0.05)
    assert not d["moved"] and d["p_value"] < 1e-15


def test_decide_champion_significant_branch_without_the_champions_weights():
    """The 'significant' branch reads the champion's val logits from its weights in MLflow; a champion version
    without the soup tag cannot be compared, and is kept with the reason (no download tried)."""
    d = decide_champion(ctx(rule="significant"), soup(accuracy=0.99), np.zeros((40, 4)), champion(accuracy=0.1))
    assert d["moved"] is False and d["reason"] == "champion v3 has no ich.soup_model_id tag"
