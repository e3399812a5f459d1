"""Soup math: running sums, uniform and greedy soups, prefetch, NaN skipping, compatibility, BN recalibration."""
import threading
import time
import warnings

import pytest
import torch
from torch import nn

from ich.checkpoint import CheckpointError, CheckpointMeta
from soups.average import Ingredient, RunningSum, greedy_soup, improves, prefetch
from soups.bn import choose_bn_mode, has_batchnorm, recalibrate_bn
from soups.compat import IncompatibleCheckpoint, check_compatible, check_state_dicts_match, group_key


def random_state_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.weight": torch.rand(4, generator=g),
        "bn.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(100 + seed, dtype=torch.int64),
        "head.weight": torch.randn(5, 4, generator=g).to(torch.bfloat16),
    }


# ---------------------------------------------------------------- averaging

def large_state_dict(seed: int) -> dict:
    """Above the threaded path's threshold, values over many magnitudes: float64 rounding depends on order."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-6, 6, 300_000)
    return {"a.weight": torch.randn(300_000, generator=g) * scale, "b.weight": torch.randn(700, 900, generator=g),
            "c.bias": torch.randn(257, generator=g) * 1e4, "d.weight": torch.randn(400, 300, generator=g).half(),
            "e.weight": torch.randn(2000, 100, generator=g).to(torch.bfloat16),
            "bn.num_batches_tracked": torch.tensor(7 + seed, dtype=torch.int64)}


def running_mean(sds, threads: int | None = None) -> dict:
    """The streaming uniform soup's sum (soups/build.SoupBuilder.uniform): RunningSum over the ingredients."""
    total = RunningSum(threads)
    for sd in sds:
        total.add(sd)
    return total.mean()


def reference_mean(sds: list[dict], extra: dict | None = None) -> dict:
    """Today's soup, written out plainly: float64 sum in ingredient order, divided once, rounded once."""
    every = sds + ([extra] if extra is not None else [])
    out = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        s = v.to(torch.float64)
        for sd in every[1:]:
            s = s + sd[k].to(torch.float64)
        out[k] = (s / len(every)).to(v.dtype)
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point()
                                                        else a[k], b[k].view(-1).view(torch.uint8)
                                                        if b[k].is_floating_point() else b[k]), k


def test_soups_are_bitwise_equal_for_any_number_of_accumulation_threads():
    sds = [large_state_dict(i) for i in range(5)]
    expected = reference_mean(sds)
    for threads in (1, 2, 3, 4):
        assert_bitwise(running_mean(sds, threads=threads), expected)
        rs = RunningSum(threads=threads)
        for sd in sds[:4]:
            rs.add(sd)
        assert_bitwise(rs.candidate_with(sds[4]), reference_mean(sds[:4], sds[4]))
        assert_bitwise(rs.mean(), reference_mean(sds[:4]))
    # greedy: every ingredient improves, so its soup is the uniform one, whatever the threads
    for threads in (1, 3):
        scores = iter(range(10))
        res = greedy_soup([Ingredient(str(i), 1.0 - i, sd) for i, sd in enumerate(sds)], lambda sd: next(scores),
                          threads=threads)
        assert res.accepted == [str(i) for i in range(5)]
        assert_bitwise(res.state_dict, expected)


def test_uniform_soup_is_float64_mean_and_keeps_int_buffers():
    sds = [random_state_dict(s) for s in range(5)]
    soup = running_mean(iter(sds))
    for k, v in soup.items():
        assert v.dtype == sds[0][k].dtype, k
        if v.is_floating_point():
            expected = torch.stack([sd[k].double() for sd in sds]).mean(0).to(v.dtype)
            assert torch.equal(v, expected), k
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert soup["bn.num_batches_tracked"].item() == 100  # the first ingredient's, never averaged


def test_uniform_soup_does_not_alias_or_modify_inputs():
    sds = [random_state_dict(s) for s in range(3)]
    before = {k: v.clone() for k, v in sds[0].items()}
    soup = running_mean(sds)
    soup["bn.num_batches_tracked"] += 1
    for k in before:
        assert torch.equal(sds[0][k], before[k]), k


def test_running_sum_candidate_does_not_commit():
    rs = RunningSum()
    rs.add({"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)})
    cand = rs.candidate_with({"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)})
    assert torch.equal(cand["w"], torch.tensor([2.0, 4.0])) and cand["n"].item() == 4
    assert rs.count == 1
    mean = rs.mean()
    assert torch.equal(mean["w"], torch.tensor([1.0, 3.0]))
    mean["n"] += 1  # outputs must not alias the running sum's buffers
    cand["n"] += 1
    assert rs.mean()["n"].item() == 4


def test_mismatched_keys_and_shapes_refused_naming_the_key():
    rs = RunningSum()
    rs.add(random_state_dict(0), "trial_0/epoch_1")
    sd = random_state_dict(1)
    del sd["bn.bias"]
    with pytest.raises(IncompatibleCheckpoint, match=r"trial_1/epoch_3 lacks key 'bn.bias'.*trial_0/epoch_1"):
        rs.add(sd, "trial_1/epoch_3")
    sd = random_state_dict(1)
    sd["head.weight"] = torch.zeros(6, 4, dtype=torch.bfloat16)
    with pytest.raises(IncompatibleCheckpoint, match=r"'head.weight' has shape \(6, 4\)"):
        rs.candidate_with(sd, "x")
    sd = random_state_dict(1)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(IncompatibleCheckpoint, match="has key 'extra.weight'"):
        running_mean([random_state_dict(0), sd])


def test_nan_ingredient_skipped_with_warning():
    bad = random_state_dict(1)
    bad["conv.weight"][0, 0, 0, 0] = float("nan")
    ings = [Ingredient("e1", 0.9, random_state_dict(0)), Ingredient("e2", 0.8, bad),
            Ingredient("e3", 0.7, random_state_dict(2))]
    with pytest.warns(RuntimeWarning, match="e2: tensor conv.weight holds NaN/Inf"):
        g = greedy_soup(ings, lambda sd: 1.0)
    assert g.accepted == ["e1", "e3"] and [s.name for s in g.skipped] == ["e2"]
    assert torch.isfinite(g.state_dict["conv.weight"]).all()


def test_all_ingredients_unusable_is_a_clear_error():
    bad = {"w": torch.tensor([float("inf")])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable ingredients"):
            greedy_soup([Ingredient("only", 1.0, bad)], lambda sd: 1.0)


# ---------------------------------------------------------------- greedy

def scalar_ingredients(values, scores):
    loads = []
    def loader(v):
        def load():
            loads.append(v)
            return {"w": torch.tensor([float(v)]), "n": torch.tensor(7)}
        return load
    return [Ingredient(f"ing{v}", s, loader(v)) for v, s in zip(values, scores)], loads


# Crafted: A=0 scores 0.80 alone; A+B (w=1) ties at 0.80; A+B+C (w=3) drops; A+C (w=3.5) improves.
SCORE_OF_W = {0.0: 0.80, 1.0: 0.80, 3.0: 0.79, 3.5: 0.85}


def evaluate_acc(sd):
    return SCORE_OF_W[round(sd["w"].item(), 6)]


@pytest.mark.parametrize("tie_rule, accepted, w", [("accept", ["ing0", "ing2"], 1.0), ("strict", ["ing0", "ing7"], 3.5)])
def test_greedy_tie_rules_pick_expected(tie_rule, accepted, w):
    ings, loads = scalar_ingredients([0, 2, 7], [0.9, 0.8, 0.7])
    res = greedy_soup(ings, evaluate_acc, tie_rule=tie_rule)
    assert res.accepted == accepted
    assert res.state_dict["w"].item() == w
    assert res.state_dict["n"].item() == 7 and res.state_dict["n"].dtype == torch.int64
    assert res.best_score == SCORE_OF_W[w]
    assert [s.accepted for s in res.steps] == [True, tie_rule == "accept", tie_rule == "strict"]
    assert res.steps[0].candidate_score == 0.80  # the first ingredient scored by evaluate, not its own score
    assert sorted(loads) == [0, 2, 7]  # each loaded once


@pytest.mark.parametrize("tie_rule, accepted", [("accept", ["ing0", "ing2"]), ("strict", ["ing0", "ing7"])])
def test_greedy_on_loss_mirrors_comparisons(tie_rule, accepted):
    ings, _ = scalar_ingredients([0, 2, 7], [0.1, 0.2, 0.3])  # losses, ascending = best-first
    res = greedy_soup(ings, lambda sd: -evaluate_acc(sd), higher_is_better=False, tie_rule=tie_rule)
    assert res.accepted == accepted


def test_greedy_tolerance_and_unsorted_refused():
    assert improves(0.8 - 1e-9, 0.8, tie_rule="accept")
    assert not improves(0.8 - 1e-6, 0.8, tie_rule="accept")
    assert not improves(0.8, 0.8, tie_rule="strict")
    assert improves(0.5 + 1e-9, 0.5, higher_is_better=False, tie_rule="accept")
    assert not improves(float("nan"), 0.5)
    with pytest.raises(ValueError, match="tie_rule"):
        greedy_soup([], evaluate_acc, tie_rule="sometimes")
    ings, _ = scalar_ingredients([0, 2], [0.7, 0.9])
    with pytest.raises(ValueError, match="not sorted best-first: ing2"):
        greedy_soup(ings, evaluate_acc)


# ---------------------------------------------------------------- prefetch

def test_prefetch_loads_next_while_consumer_works_and_bounds_lookahead():
    loaded = []
    second_loaded = threading.Event()

    def items():
        for i in range(4):
            loaded.append(i)
            if i == 1:
                second_loaded.set()
            yield i

    got = []
    for x in prefetch(items(), depth=1):
        if x == 0:
            assert second_loaded.wait(5)  # item 1 was produced while we held item 0
            time.sleep(0.2)
            assert loaded == [0, 1]  # ...but not item 2: at most one ahead
        got.append(x)
    assert got == [0, 1, 2, 3]


def test_prefetch_propagates_exceptions():
    def items():
        yield 1
        raise CheckpointError("trial_2/epoch_4: sha256 mismatch")

    it = prefetch(items(), depth=1)
    assert next(it) == 1
    with pytest.raises(CheckpointError, match="trial_2/epoch_4"):
        next(it)


def test_greedy_load_error_names_checkpoint():
    def broken():
        raise CheckpointError("trial_5/epoch_9: not a valid safetensors file")
    ings = [Ingredient("a", 0.9, {"w": torch.zeros(1)}), Ingredient("trial_5/epoch_9", 0.8, broken)]
    with pytest.raises(CheckpointError, match="trial_5/epoch_9"):
        greedy_soup(ings, lambda sd: 0.5)


# ---------------------------------------------------------------- compatibility

def meta(**over):
    base = dict(architecture="coatnet_tiny", img_size=32, num_classes=3, class_names=["Đờn ca", "Hát bội", "Lễ hội"],
                dataset_fingerprint="d1", init_fingerprint="i1", epoch=1)
    base.update(over)
    return CheckpointMeta(**base)


def test_incompatible_checkpoints_refused_naming_field():
    check_compatible([("trial_0/epoch_1", meta()), ("trial_1/epoch_2", meta(epoch=2))])  # epoch may differ
    with pytest.raises(IncompatibleCheckpoint,
                       match=r"checkpoint trial_3/epoch_2 differs from trial_0/epoch_1 in img_size: 64 != 32"):
        check_compatible([("trial_0/epoch_1", meta()), ("trial_1/epoch_1", meta()),
                          ("trial_3/epoch_2", meta(img_size=64))])
    with pytest.raises(IncompatibleCheckpoint, match="in init_fingerprint: i2 != i1"):
        check_compatible([("a", meta()), ("b", meta(init_fingerprint="i2"))])
    with pytest.raises(IncompatibleCheckpoint, match=r"in class_names: 1 name\(s\) differ.*'Múa' != 'Hát bội'"):
        check_compatible([("a", meta()), ("b", meta(class_names=["Đờn ca", "Múa", "Lễ hội"]))])
    with pytest.raises(IncompatibleCheckpoint, match="in class_names: same names in another order"):
        check_compatible([("a", meta()), ("b", meta(class_names=["Hát bội", "Đờn ca", "Lễ hội"]))])
    assert issubclass(IncompatibleCheckpoint, CheckpointError)


def test_group_key_splits_variants_and_preprocessing():
    """The key the orchestrator groups across-run soups by (soups/pull.Pulled.group_key): epochs share a group,
    another architecture, img size or preprocessing does not."""
    items = [("a", meta()), ("b", meta(architecture="coatnet_0")), ("c", meta(epoch=5)), ("d", meta(img_size=64)),
             ("e", meta(preprocess={**meta().preprocess, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))]
    groups: dict[tuple, list[str]] = {}
    for name, m in items:
        groups.setdefault(group_key(m), []).append(name)
    assert sorted(groups.values()) == [["a", "c"], ["b"], ["d"], ["e"]]


def test_check_state_dicts_match_int_vs_float():
    ref = {"bn.num_batches_tracked": torch.tensor(1)}
    with pytest.raises(IncompatibleCheckpoint, match="ckpt_x: key 'bn.num_batches_tracked' has dtype torch.float32"):
        check_state_dicts_match(ref, {"bn.num_batches_tracked": torch.tensor(1.0)}, "ckpt_x")


# ---------------------------------------------------------------- BatchNorm

class TinyConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.drop(self.bn(self.conv(x)))
        return self.head(h.mean((2, 3)))


def test_recalibrate_bn_sets_stats_to_data_statistics():
    torch.manual_seed(0)
    model = TinyConvBN()
    assert has_batchnorm(model) and not has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    model.bn.running_mean.fill_(5.0)  # stale stats, as after averaging
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        feats = torch.cat([model.conv(b) for b in batches])  # (24, 4, 6, 6)
    data_mean = feats.mean((0, 2, 3))
    # per-batch unbiased variances averaged equally (what a cumulative moving average over equal batches gives)
    data_var = torch.stack([model.conv(b).detach().transpose(0, 1).reshape(4, -1).var(1) for b in batches]).mean(0)

    out = recalibrate_bn(model, [(b, torch.zeros(8)) for b in batches])
    assert out is model and not model.training and not model.bn.training
    assert torch.allclose(model.bn.running_mean, data_mean, atol=1e-5)
    assert torch.allclose(model.bn.running_var, data_var, rtol=1e-4)
    assert model.bn.momentum == 0.3  # restored
    assert model.bn.num_batches_tracked.item() == 3


def test_recalibrate_bn_refuses_empty_batches_without_touching_stats():
    model = TinyConvBN()
    model.bn.running_mean.fill_(2.0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    assert torch.all(model.bn.running_mean == 2.0)


def test_choose_bn_mode():
    assert choose_bn_mode(0.80, 0.81) == "recalibrate"
    assert choose_bn_mode(0.80, 0.80) == "average"
    assert choose_bn_mode(0.5, 0.4, higher_is_better=False) == "recalibrate"
    assert choose_bn_mode(0.5, float("nan"), higher_is_better=False) == "average"


# ---------------------------------------------------------------- soft voting's logits, bounded

def test_prefetch_map_keeps_order_bounds_flight_and_raises_in_place():
    from soups.average import prefetch_map
    started, lock = [], threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(0.01)
        if i == 7:
            raise OSError("item 7 broke")
        return i * i

    seen = []
    gen = prefetch_map(fn, range(10), workers=2, depth=2)
    for i, r in enumerate(gen):
        seen.append(r)
        with lock:
            assert max(started) <= i + 2  # never more than depth ahead of the consumer
        if i == 6:
            with pytest.raises(OSError, match="item 7"):
                next(gen)
            break
    assert seen == [i * i for i in range(7)]


def test_prediction_store_writes_through_keeps_memory_bounded_and_soft_vote_stream_is_bitwise(tmp_path):
    import numpy as np

    from soups.analysis import soft_vote
    from soups.logit_store import PredictionStore, cached_logits_path, soft_vote_stream
    rng = np.random.default_rng(0)
    per = {f"m{i}": {"val": rng.normal(size=(67, 17)).astype(np.float32) * 10,
                     "test": rng.normal(size=(74, 17)).astype(np.float32)} for i in range(40)}
    one = PredictionStore.nbytes(per["m0"])
    shapes = {"val": (67, 17), "test": (74, 17)}
    store = PredictionStore(tmp_path / "cache", max_bytes=5 * one, shapes=shapes)
    for k, v in per.items():
        store[k] = v
    assert len(store) == 40 and "m0" in store and "m39" in store and "nope" not in store
    assert store.peak_bytes_in_memory == store.bytes_in_memory == 5 * one  # never above the limit
    # written through: every model's file, whether or not it is still in memory
    assert store.bytes_on_disk == 40 * one and len(list((tmp_path / "cache").glob("*.npy"))) == 80
    for k in ("m0", "m17", "m39"):  # dropped from memory and in memory alike come back exactly
        assert all(np.array_equal(store[k][s], per[k][s]) for s in ("val", "test"))
    del store["m0"]
    assert "m0" not in store and store.bytes_on_disk == 39 * one
    store["m1"] = per["m1"]  # put again: its files replaced, not counted twice
    assert store.bytes_on_disk == 39 * one and len(store) == 39
    for split in ("val", "test"):
        arrays = [per[k][split] for k in per]
        assert np.array_equal(soft_vote_stream(store[k][split] for k in per if k in store),
                              soft_vote([per[k][split] for k in per if k != "m0"]))
        assert np.array_equal(soft_vote_stream(iter(arrays)), soft_vote(arrays))
    store.close()
    assert (tmp_path / "cache").is_dir()  # the cache is not the store's to remove

    # A later store over the same folder (the next `ich soup`, or `ich report`) finds what was written...
    later = PredictionStore(tmp_path / "cache", shapes=shapes)
    assert "m5" in later and np.array_equal(later["m5"]["test"], per["m5"]["test"]) and len(later) == 0
    # ... but not a file of another dataset build (shape) or a torn/non-finite one: that model is run again.
    np.save(cached_logits_path(tmp_path / "cache", "m6", "val"), np.zeros((60, 17), np.float32))
    bad = per["m7"]["test"].copy()
    bad[0, 0] = np.nan
    np.save(cached_logits_path(tmp_path / "cache", "m7", "test"), bad)
    assert "m6" not in later and "m7" not in later and "m8" in later
    assert "m6" in PredictionStore(tmp_path / "cache")  # control: without the shapes the 60-row file would pass

    owned = PredictionStore(max_bytes=0)  # no folder: a temp one of its own, removed by close()
    owned["a"] = per["m1"]
    folder = owned.folder
    assert folder.is_dir() and np.array_equal(owned["a"]["val"], per["m1"]["val"])
    owned.close()
    assert not folder.exists()


def test_prediction_store_falls_back_to_a_temp_folder_when_the_cache_cannot_be_written(tmp_path, capsys):
    import numpy as np

    from soups.logit_store import PredictionStore
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    store = PredictionStore(blocker / "cache")
    logits = {"val": np.ones((3, 2), np.float32), "test": np.zeros((4, 2), np.float32)}
    store["m"] = logits
    store["n"] = logits
    out = capsys.readouterr().out
    assert out.count("not written") == 1 and str(blocker / "cache") in out  # said once
    assert store.folder != blocker / "cache" and np.array_equal(store["n"]["test"], logits["test"])
    store.close()
