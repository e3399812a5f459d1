"""WiSE-FT's cost against the evaluations it makes (issue 21 item 7), side by side in one run.

The α curve as `ich soup --recipe wise_ft` makes it (soups/recipes/wise_ft.alpha_curve: for each α, the
interpolation soups/average.wise_ft, loading it into the evaluator's network, the val forward pass and its metrics)
against grid points × one val evaluation of the fine-tuned model (load, forward, metrics) on the same network and
val set. Goal (issue 21): curve / (grid × one val evaluation) <= 1.2. The curve `ich soup` logs also evaluates
test at every α (for the report only); that curve is timed too, against grid × (one val + one test evaluation).

The model is `--model` (its random init, and a fine-tuned side = init + 1e-2·N(0, 1)), the val and test sets are
`--n-val`/`--n-test` random images at the model's size (the digits' val set is 179 images); the head is kept
(`--wise-head keep`, the default). Each variant runs `--repeats` times, alternating, and the medians are compared.

    python bench/wise_ft_cost.py [--model coatnet_tiny_ich] [--n-val 179] [--n-test 179] [--repeats 3] [--threads 1]

Measured here (2 cores shared with other test runs, 1 thread, 2026-12-07): coatnet_tiny_ich, 179/179 images at
32 px, 9 repeats: curve / (11 x val) 1.095 (0.471 s vs 0.430 s; about 4 ms of interpolation per α, ~200 small
tensors), logged curve 0.926 (noise); coatnet_0_rw_224, 16/16 images at 224 px, 2 repeats: 1.005 (24.20 s vs
24.09 s), logged curve 1.084. The float64 interpolation this replaced (torch.lerp in the weights' own precision now)
cost 0.73 s per α on coatnet_0 against lerp's 0.13 s, and gave 1.24 there. Not in run_all.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich.data import ICHDataset, Split  # noqa: E402
from ich.models import classifier_keys, create_model  # noqa: E402
from ich.preprocess import dataset_default  # noqa: E402
from soups.evaluate import EvalSpec, Evaluator  # noqa: E402
from soups.options import WISE_ALPHAS, alpha_grid  # noqa: E402
from soups.recipes.wise_ft import alpha_curve  # noqa: E402

NUM_CLASSES = 17


def dataset(img_size: int, n_val: int, n_test: int) -> ICHDataset:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, img_size, img_size, 3), dtype=np.uint8),
                     rng.integers(0, NUM_CLASSES, n).astype(np.int64))
    return ICHDataset({"classes": [f"c{i}" for i in range(NUM_CLASSES)], "fingerprint": "bench",
                       "image_size": img_size}, {"val": split(n_val), "test": split(n_test)})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_tiny_ich")
    p.add_argument("--n-val", type=int, default=179)
    p.add_argument("--n-test", type=int, default=179)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    img_size = 224 if "224" in a.model else 32
    torch.manual_seed(0)
    init = create_model(a.model, NUM_CLASSES, img_size).state_dict()
    gen = torch.Generator().manual_seed(1)
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
          for k, v in init.items()}
    ev = Evaluator(dataset(img_size, a.n_val, a.n_test), EvalSpec(a.model, dataset_default(img_size, 1.0)),
                   device=a.device)
    keep = classifier_keys(ev.model)
    grid = alpha_grid(WISE_ALPHAS)

    def val_eval(sd: dict) -> dict:
        return {"val": ev.metrics(ev.logits(sd, "val"), "val")}

    def val_test_eval(sd: dict) -> dict:
        return {"val": ev.metrics(ev.logits(sd, "val"), "val"), "test": ev.metrics(ev.logits(None, "test"), "test")}

    variants = {
        "val evaluations": lambda: [val_eval(ft) for _ in grid],
        "curve (val)": lambda: alpha_curve(init, ft, grid, val_eval, keep=keep),
        "val+test evaluations": lambda: [val_test_eval(ft) for _ in grid],
        "curve (val+test, as logged)": lambda: alpha_curve(init, ft, grid, val_test_eval, keep=keep),
    }
    val_eval(ft)  # warm-up: first-call allocations out of the timings
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["curve (val)"] / med["val evaluations"]
    ratio_logged = med["curve (val+test, as logged)"] / med["val+test evaluations"]
    params = sum(v.numel() for v in init.values() if v.is_floating_point())
    print(f"{a.model}: {params / 1e6:.2f} M parameters, {len(grid)} grid points, val {a.n_val} / test {a.n_test} "
          f"images at {img_size} px, {a.repeats} repeats, {torch.get_num_threads()} threads, {a.device}")
    print("figure | measured | goal\n--- | --- | ---")
    for name, t in med.items():
        print(f"{name} (median) | {t:.3f} s | info")
    print(f"WiSE-FT curve / ({len(grid)} x one val evaluation) | {ratio:.3f} | <= 1.2")
    print(f"logged curve (val+test) / ({len(grid)} x one val and one test evaluation) | {ratio_logged:.3f} | info")
    return {"model": a.model, **{f"{k} s": v for k, v in med.items()}, "ratio": ratio, "ratio_logged": ratio_logged}


if __name__ == "__main__":
    main()
