"""The learned soup's cost (issue 21 item 7): its peak memory with N ingredients against one model's size, and its
time per optimisation step against one forward+backward pass of the plain model on the same batch, side by side in
one run.

The ingredients are a model's init plus seeded deltas; the fit half is `--batch` random images at the model's size,
one batch per step (soups/recipes/learned.fit, by model or by layer). Peak memory is the process's peak RSS growth
over the fit (resource.getrusage, measured in a fresh child process per variant so one variant's peak does not hide
the other's), reported as a multiple of one model's weights: the ingredients held at once are N of them, so about N
plus the autograd graph of one step is what to expect. Information only: the issue sets no goal for these rows.

    python bench/learned_cost.py [--model coatnet_tiny_ich] [--n 16] [--batch 64] [--steps 5] [--by model|layer]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_name: str, n: int, batch: int, steps: int, by: str) -> dict:
    """One variant in this process: {"model_mb", "before_mb", "base_peak_mb", "peak_mb", "step_s", "plain_step_s"}."""
    import torch

    from ich.models import create_model
    from soups.recipes.learned import fit

    torch.manual_seed(0)
    size = 224 if "224" in model_name else 32
    model = create_model(model_name, 17, size)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_mb = sum(v.numel() * v.element_size() for v in init.values()) / 2**20
    before = _rss_mb()  # the model and its init copy: the ingredients and the fit come on top
    gen = torch.Generator().manual_seed(1)
    sds = [{k: v + 1e-2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in init.items()} for _ in range(n)]
    x, y = torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 17, (batch,), generator=gen)

    # the plain model: one forward+backward+step on the same batch (the unit a step of the fit is compared with)
    model.train(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plain = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        plain.append(time.perf_counter() - t0)
    base = _rss_mb()
    t0 = time.perf_counter()
    fit(model, sds, lambda: [(x, y)], lambda sd: 0.0, by=by, steps=steps, lr=0.1, seed=0)
    fit_s = time.perf_counter() - t0
    return {"model_mb": model_mb, "before_mb": before, "base_peak_mb": base, "peak_mb": _rss_mb(), "step_s": fit_s / steps,
            "plain_step_s": sorted(plain)[len(plain) // 2]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_tiny_ich")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--by", choices=("model", "layer", "both"), default="both")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.n, a.batch, a.steps, a.by)))
        return []
    rows = []
    for by in (("model", "layer") if a.by == "both" else (a.by,)):
        out = subprocess.run([sys.executable, __file__, "--child", "--model", a.model, "--n", str(a.n), "--batch",
                              str(a.batch), "--steps", str(a.steps), "--by", by], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        rows.append({"by": by, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{a.model}: {rows[0]['model_mb']:.1f} MB of weights, {a.n} ingredients, batch {a.batch}, {a.steps} steps")
    print("figure | measured | goal\n--- | --- | ---")
    for r in rows:
        held, grown = r["peak_mb"] - r["before_mb"], r["peak_mb"] - r["base_peak_mb"]
        print(f"learned by {r['by']}: peak RSS (ingredients + fit) / one model | {held / r['model_mb']:.1f} "
              f"({held:.0f} MB; the fit itself {grown:.0f} MB) | report")
        print(f"learned by {r['by']}: time per step | {r['step_s']:.3f} s "
              f"({r['step_s'] / r['plain_step_s']:.2f}x one plain forward+backward) | report")
    return rows


if __name__ == "__main__":
    main()
