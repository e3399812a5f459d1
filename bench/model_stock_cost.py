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
import tempfile
import time
from pathlib import Path

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


def uniform(init: dict | None, sds) -> dict:
    total = RunningSum()
    for sd in sds:
        total.add(sd)
    return total.mean()


def model_stock(init: dict, sds) -> dict:
    total = ModelStockSum(init)
    for sd in sds:
        total.add(sd)
    return total.result()


def write_folders(root: Path, model: str, init: dict, sds: list[dict]) -> tuple[tuple[Path, str], list]:
    """Each state dict as a checkpoint folder; (folder, sha256) of the init and of every ingredient."""
    from ich.checkpoint import CheckpointMeta, save_checkpoint
    meta = CheckpointMeta(model, 224, 17, [f"c{i}" for i in range(17)], "bench-data", "bench-init", 0)
    made = [(root / f"m{i}", save_checkpoint(root / f"m{i}", sd, meta)) for i, sd in enumerate([init, *sds])]
    return made[0], made[1:]


def read(folder: tuple[Path, str]) -> dict:
    from ich.checkpoint import load_checkpoint
    return load_checkpoint(folder[0], expected_sha256=folder[1])[0]


def uniform_from_files(init: tuple[Path, str], folders: list[tuple[Path, str]]) -> dict:
    return uniform(None, (read(f) for f in folders))  # one ingredient held at a time, as in `ich soup`


def model_stock_from_files(init: tuple[Path, str], folders: list[tuple[Path, str]]) -> dict:
    return model_stock(read(init), (read(f) for f in folders))


def timed(variants: dict, args: tuple, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the variants alternating repeat by repeat."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_0_rw_224")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    init, sds = ingredients(a.model, a.n)
    params = sum(v.numel() for v in init.values() if v.is_floating_point())
    med = timed({"uniform": uniform, "model_stock": model_stock}, (init, sds), a.repeats)
    with tempfile.TemporaryDirectory(prefix="ich-ms-bench-") as tmp:
        folders = write_folders(Path(tmp), a.model, init, sds)
        del sds  # from here on the ingredients exist only as files
        files = timed({"uniform": uniform_from_files, "model_stock": model_stock_from_files}, folders, a.repeats)
    ratio, files_ratio = med["model_stock"] / med["uniform"], files["model_stock"] / files["uniform"]
    print(f"{a.model}: {params / 1e6:.1f} M parameters, {a.n} ingredients, {a.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print("figure | measured | goal\n--- | --- | ---")
    print(f"uniform soup, in memory (median) | {med['uniform']:.2f} s | info")
    print(f"Model Stock, in memory (median) | {med['model_stock']:.2f} s | info")
    print(f"Model Stock / uniform, in memory | {ratio:.2f} | info (the arithmetic alone)")
    print(f"uniform soup, from checkpoint files (median) | {files['uniform']:.2f} s | info")
    print(f"Model Stock, from checkpoint files (median) | {files['model_stock']:.2f} s | info")
    print(f"Model Stock / uniform, from checkpoint files | {files_ratio:.2f} | <= 1.3")
    return {"model": a.model, "n": a.n, **{f"{k}_s": v for k, v in med.items()}, "ratio": ratio,
            **{f"{k}_from_files_s": v for k, v in files.items()}, "ratio_from_files": files_ratio}

if __name__ == "__main__":
    main()
