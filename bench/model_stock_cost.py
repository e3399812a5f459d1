"""Model Stock's cost against the uniform soup on the same ingredients (issue 21 item 7), side by side in one run.

Both stream the same N state dicts (a model's init plus seeded deltas) through their running sums and finish
their soup: soups/average.py's RunningSum (uniform) and ModelStockSum (the uniform sum plus a sum of unit deltas
from the init). The ingredients are made before timing, so only the souping is measured; each variant runs
`--repeats` times, alternating, and the medians are compared (goal: Model Stock / uniform <= 1.3, issue 21).
Reading the files is the same for both and left out: in `ich soup` the one extra read is the init's.

    python bench/model_stock_cost.py [--model coatnet_0_rw_224] [--n 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ich.models import create_model
from soups.average import ModelStockSum, RunningSum


def ingredients(model: str, n: int) -> tuple[dict, list[dict]]:
    torch.manual_seed(0)
    init = create_model(model, 17, 224 if "224" in model else 32).state_dict()
    gen = torch.Generator().manual_seed(1)
    sds = [{k: v + 1e-2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in init.items()} for _ in range(n)]
    return init, sds


def uniform(init: dict, sds: list[dict]) -> dict:
    total = RunningSum()
    for sd in sds:
        total.add(sd)
    return total.mean()


def model_stock(init: dict, sds: list[dict]) -> dict:
    total = ModelStockSum(init)
    for sd in sds:
        total.add(sd)
    return total.result()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_0_rw_224")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    init, sds = ingredients(a.model, a.n)
    params = sum(v.numel() for v in init.values() if v.is_floating_point())
    times: dict[str, list[float]] = {"uniform": [], "model_stock": []}
    for _ in range(a.repeats):
        for name, fn in (("uniform", uniform), ("model_stock", model_stock)):
            t0 = time.perf_counter()
            fn(init, sds)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["model_stock"] / med["uniform"]
    print(f"{a.model}: {params / 1e6:.1f} M parameters, {a.n} ingredients, {a.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print("figure | measured | goal\n--- | --- | ---")
    print(f"uniform soup (median) | {med['uniform']:.2f} s | info")
    print(f"Model Stock (median) | {med['model_stock']:.2f} s | info")
    print(f"Model Stock / uniform | {ratio:.2f} | <= 1.3")
    return {"model": a.model, "n": a.n, **{f"{k}_s": v for k, v in med.items()}, "ratio": ratio}


if __name__ == "__main__":
    main()
