"""GPU figures in one prepared run (bench/gpu.sh wraps it with a timeout): training throughput of coatnet_0_rw_224,
the same under the sweep with two trials sharing the GPU, model FLOP utilisation, and soup times.

    python bench/gpu_bench.py [--out DIR] [--budget-s 450] [--skip SECTION ...] [--smoke]

Sections, in this order (each prints its rows as soon as it has them and rewrites DIR/gpu_results.json, so a
run cut short by the timeout keeps what it measured; a section that fails prints its error and the rest go on;
a section that would not fit in what is left of --budget-s is skipped with a note):

- bare: `ich.train.Trainer.train_epoch` of coatnet_0_rw_224 at 224 px, the GPU recipe of sweeps/configs/gpu.yaml
  (batch 64 x accum 2, MixUp/CutMix, RandAugment, random erasing: augmentation on the GPU) with bf16 autocast and
  channels_last, no torch.compile, on a synthetic in-memory ICHDataset (17 classes, 2,048 train images stored at
  256 px, random pixels: nothing is downloaded). images/s = median over the measured epochs after a warm-up epoch.
- mfu: FLOPs of one training step (forward + backward, batch 64, bf16) counted with
  torch.utils.flop_counter.FlopCounterMode, per image, times the bare images/s, over the GPU's dense bf16 peak
  (H100 SXM / H200: 989 TFLOP/s; picked from torch.cuda.get_device_name).
- sweep: Ray Tune runs two trials of sweeps.trainable.train_trial at 0.5 GPU each, concurrently, logging every
  epoch's checkpoint to a local MLflow server (soups.tracking_server.start_server); the figure is the two
  trials' summed train-loop images/s (per-trial median of epochs >= 2) over the bare images/s, same flags. Needs
  ray and mlflow in the Python that runs this (the CUDA image's python3 has neither: carry them as wheels).
- soup: 16 checkpoints of coatnet_0 size (107 MB each) written to a temp folder; uniform soup (CPU, float64,
  prefetch) vs a raw read of the same files from the page cache; greedy soup whose evaluate loads the candidate
  into the model on the GPU and runs 512 images (2 batches of 256, bf16): greedy time / sum of evaluate times.
- compile: the bare measurement again with torch.compile (first epoch = compilation, not timed); compiled
  images/s over eager and its MFU.

`--smoke` runs every section on whatever device there is (CPU here) at toy sizes: the tiny CoAtNet at 32 px,
128 train images, 1+1 epochs, 2 checkpoints, no compile. The figures are then meaningless; the code paths run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("bare", "mfu", "sweep", "soup", "compile")
# Seconds a section needs at least (full sizes) before it is started; a rough plan for an H100.
NEEDS_S = {"bare": 60, "mfu": 20, "sweep": 150, "soup": 90, "compile": 150}
# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
         ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]

FULL = dict(model="coatnet_0_rw_224", img_size=224, stored=256, n_train=2048, n_val=256, warmup_epochs=1,
            epochs=4, sweep_epochs=4, n_ckpt=16, greedy_eval_images=512, eval_batch=256, compile=True)
SMOKE = dict(model="coatnet_tiny_ich", img_size=32, stored=36, n_train=96, n_val=48, warmup_epochs=1,
             epochs=1, sweep_epochs=2, n_ckpt=2, greedy_eval_images=32, eval_batch=16, compile=False)
NUM_CLASSES = 17


def peak_flops(name: str) -> float | None:
    for key, peak in PEAKS:
        if key in name:
            return peak
    return None


def synthetic_dataset(n_train: int, n_val: int, stored: int, seed: int = 0):
    """An in-memory ICHDataset of random pixels: 17 classes, train/val/test, nothing on disk."""
    import numpy as np
    from ich.data import ICHDataset, Split
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(NUM_CLASSES)]

    def split(n: int, name: str) -> Split:
        images = rng.integers(0, 256, (n, stored, stored, 3), dtype=np.uint8)
        labels = (np.arange(n) % NUM_CLASSES).astype(np.int64)
        return Split(images, labels, [f"{name}/{i}.jpg" for i in range(n)])

    splits = {"train": split(n_train, "train"), "val": split(n_val, "val"), "test": split(n_val, "test")}
    manifest = {"format_version": 1, "image_format": "rgb8", "image_size": stored, "classes": classes,
                "num_classes": NUM_CLASSES, "layout": "synthetic",
                "num_images": {k: len(v) for k, v in splits.items()},
                "fingerprint": f"synthetic-{n_train}-{n_val}-{stored}-{seed}", "skipped": [], "shards": {}}
    return ICHDataset(manifest, splits)


def train_config(p: dict, cuda: bool, **over):
    """The GPU recipe (sweeps/configs/gpu.yaml `train:`) at the bench's sizes."""
    import yaml
    from ich.train import TrainConfig
    recipe = yaml.safe_load((ROOT / "sweeps" / "configs" / "gpu.yaml").read_text())["train"]
    recipe.update(model=p["model"], img_size=p["img_size"], epochs=p["warmup_epochs"] + p["epochs"],
                  amp="bf16" if cuda else "off", channels_last="on" if cuda else "off", compile=False,
                  schedule="constant", eval_batch_size=p["eval_batch"])
    if not cuda:
        recipe.update(batch_size=32, accum_steps=1)
    recipe.update(over)
    return TrainConfig.from_dict(recipe)


class Bench:
    def __init__(self, p: dict, out: Path, budget_s: float, smoke: bool):
        import torch
        self.p, self.out, self.smoke = p, out, smoke
        self.deadline = time.monotonic() + budget_s
        self.cuda = torch.cuda.is_available()
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.peak = peak_flops(self.device_name) if self.cuda else None
        self.rows: list[tuple[str, str, str]] = []
        self.results: dict = {"params": p, "device": self.device_name, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "peak_bf16_flops": self.peak, "sections": {}}
        self.data = None

    # ------------------------------------------------------------------ plumbing
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, figure: str, measured: str, goal: str = "info") -> None:
        self.rows.append((figure, measured, goal))
        print(f"ROW | {figure} | {measured} | {goal}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["rows"] = self.rows
        (self.out / "gpu_results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def run(self, name: str, fn) -> None:
        need = NEEDS_S[name] if not self.smoke else 0
        if self.left() < need:
            self.results["sections"][name] = {"skipped": f"{self.left():.0f} s left, needs ~{need} s"}
            print(f"# {name}: skipped ({self.left():.0f} s left of the budget, needs ~{need} s)", flush=True)
            return
        print(f"# {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            self.results["sections"][name] = fn() or {}
        except Exception as e:
            traceback.print_exc()
            self.results["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"# {name}: FAILED {type(e).__name__}: {e}", flush=True)
        self.results["sections"].setdefault(name, {})["wall_s"] = time.perf_counter() - t0
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        self.save()

    def dataset(self):
        if self.data is None:
            self.data = synthetic_dataset(self.p["n_train"], self.p["n_val"], self.p["stored"])
        return self.data

    # ------------------------------------------------------------------ sections
    def train_throughput(self, compile: bool) -> dict:
        import torch
        from ich.train import Trainer
        cfg = train_config(self.p, self.cuda, compile=compile)
        trainer = Trainer(cfg, self.dataset())
        t0 = time.perf_counter()
        for _ in range(self.p["warmup_epochs"]):
            trainer.train_epoch()
        warm_s = time.perf_counter() - t0
        epochs = [trainer.train_epoch() for _ in range(self.p["epochs"])]
        out = {"images_per_s": statistics.median(e["images_per_s"] for e in epochs),
               "per_epoch": [e["images_per_s"] for e in epochs],
               "data_wait_share": statistics.median(e["data_wait_share"] for e in epochs),
               "warmup_s": warm_s, "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps,
               "amp": cfg.amp, "channels_last": cfg.channels_last, "compile": compile}
        if self.cuda:
            out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        del trainer
        if self.cuda:
            torch.cuda.empty_cache()
        return out

    def bare(self) -> dict:
        r = self.train_throughput(compile=False)
        self.bare_ips = r["images_per_s"]
        self.row(f"bare training, {self.p['model']} {self.p['img_size']}px b{r['batch_size']}x{r['accum_steps']}, "
                 f"amp {r['amp']}, channels_last {r['channels_last']}, eager ({self.device_name})",
                 f"{r['images_per_s']:.0f} img/s (data wait {r['data_wait_share']:.1%})")
        return r

    def flops_per_image(self) -> float:
        import torch
        import torch.nn.functional as F
        from torch.utils.flop_counter import FlopCounterMode
        from ich.models import create_model
        dev = torch.device("cuda" if self.cuda else "cpu")
        cfg = train_config(self.p, self.cuda)
        model = create_model(cfg.model, NUM_CLASSES, cfg.img_size).to(dev).train()
        x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=dev)
        y = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=dev)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        counter = FlopCounterMode(display=False)
        with counter:
            with ctx:
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
        return counter.get_total_flops() / cfg.batch_size

    def mfu(self) -> dict:
        fpi = self.flops_per_image()
        self.flops_per_img = fpi
        out = {"flops_per_image": fpi}
        ips = getattr(self, "bare_ips", None)
        if ips is None:
            self.row("model FLOPs per training image (fwd+bwd)", f"{fpi / 1e9:.2f} GFLOP")
            return out
        achieved = fpi * ips
        out.update(achieved_flops=achieved, mfu=achieved / self.peak if self.peak else None)
        where = f"of {self.peak / 1e12:.0f} TFLOP/s bf16 peak" if self.peak else "no known peak for this device"
        mfu = f"{achieved / self.peak:.1%}" if self.peak else "n/a"
        self.row(f"model FLOP utilisation, eager ({fpi / 1e9:.2f} GFLOP/img fwd+bwd, {where})",
                 f"{mfu} ({achieved / 1e12:.1f} TFLOP/s achieved)")
        return out

    def sweep(self) -> dict:
        try:
            import mlflow  # noqa: F401
            import ray
        except ImportError as e:
            self.row("sweep: 2 trials at 0.5 GPU, summed img/s / bare", f"not run: {e} (carry ray + mlflow wheels)",
                     ">= 0.9")
            return {"skipped": str(e)}
        from mlflow import MlflowClient
        from ray import tune

        from ich.models import create_model, random_init_fingerprint
        from ich.checkpoint import state_dict_to_cpu
        from soups.store import registry
        from soups.store.signing import own_key
        from soups.tracking_server import start_server
        from sweeps.trainable import Init, SweepContext, train_trial
        import torch

        data = self.dataset()
        cfg = train_config(self.p, self.cuda, epochs=self.p["sweep_epochs"])
        torch.manual_seed(cfg.init_seed)
        sd = state_dict_to_cpu(create_model(cfg.model, data.num_classes, cfg.img_size).state_dict())
        inits = {cfg.model: Init(sd, random_init_fingerprint(cfg.model, data.num_classes, cfg.img_size,
                                                             cfg.init_seed), "random")}
        cpus = os.cpu_count() or 2
        per_trial = {"cpu": max(1, cpus // 2 - 1), "gpu": 0.5} if self.cuda else {"cpu": 1}
        with tempfile.TemporaryDirectory(prefix="ich-gpu-sweep-") as tmp:
            server = start_server(Path(tmp) / "mlflow")
            try:
                # address="local": always a fresh instance, never a cluster some other process started
                ray.init(address="local", num_cpus=cpus if self.cuda else 2, num_gpus=1 if self.cuda else 0,
                         include_dashboard=False, log_to_driver=False)
                client = MlflowClient(server.uri)
                exp = registry.get_or_create_experiment(client, "gpu-bench")
                parent = client.create_run(exp, run_name="gpu-bench",
                                           tags={"ich.kind": "sweep", "ich.sweep": "gpu-bench"})
                # The bench's own key, in its temp folder: the trials sign their checkpoints as a sweep's do
                # (docs/design.md#14), whatever ICH_HOME is (unset: ./.ich, which a trial resolves in its own cwd).
                key = Path(tmp) / "keys" / "signing_key"
                own_key(key)
                ctx = SweepContext(sweep="gpu-bench", experiment_id=exp, parent_run_id=parent.info.run_id,
                                   tracking_uri=server.uri, train=dataclasses.asdict(cfg), signing_key=str(key))
                trainable = tune.with_resources(
                    tune.with_parameters(train_trial, dataset=data, inits=inits, ctx=ctx), per_trial)
                tuner = tune.Tuner(trainable, param_space={"seed": tune.grid_search([1, 2])},
                                   tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=2),
                                   run_config=tune.RunConfig(name="gpu-bench", storage_path=str(Path(tmp) / "ray"),
                                                             verbose=0))
                grid = tuner.fit()
                frames = [grid[i].metrics_dataframe for i in range(len(grid))]
                errors = [str(grid[i].error) for i in range(len(grid)) if grid[i].error]
            finally:
                ray.shutdown()
                server.stop()
        if errors:
            raise RuntimeError(f"sweep trials failed: {errors[0][:500]}")
        per = []
        spans = []
        for df in frames:
            later = df[df["epoch"] >= 2] if (df["epoch"] >= 2).any() else df
            per.append(float(later["images_per_s"].median()))
            end = later["timestamp"].astype(float)
            spans.append((float((end - later["time_this_iter_s"]).min()), float(end.max())))
        overlap = max(0.0, min(s[1] for s in spans) - max(s[0] for s in spans))
        longest = max(s[1] - s[0] for s in spans) or 1.0
        summed = sum(per)
        bare = getattr(self, "bare_ips", None)
        iter_s = [float(df["time_this_iter_s"].iloc[1:].median() if len(df) > 1 else df["time_this_iter_s"].median())
                  for df in frames]
        out = {"per_trial_images_per_s": per, "summed": summed, "bare": bare, "overlap_share": overlap / longest,
               "time_this_iter_s": iter_s, "resources": per_trial,
               "columns": list(frames[0].columns) if frames else []}
        measured = f"{summed:.0f} img/s summed ({' + '.join(f'{v:.0f}' for v in per)})"
        if bare:
            out["ratio"] = summed / bare
            measured = f"{summed / bare:.2f} ({measured} / bare {bare:.0f}; trials overlapped {overlap / longest:.0%})"
        self.row("sweep: 2 trials sharing the GPU at 0.5 each (Tune + MLflow per epoch), summed train img/s / bare",
                 measured, ">= 0.9")
        return out

    def soup(self) -> dict:
        from bench import soup_bench as sb
        p = self.p
        with tempfile.TemporaryDirectory(prefix="ich-gpu-soup-") as tmp:
            t0 = time.perf_counter()
            folders = sb.write_checkpoints(Path(tmp), p["n_ckpt"], p["model"], p["img_size"])
            write_s = time.perf_counter() - t0
            u = sb.time_uniform_vs_read(folders, p["n_ckpt"], repeats=2)
            from soups.average import default_threads
            # page cache: the read is a memcpy, the float64 accumulation the floor (information, not a goal;
            # cold reads and downloads are in bench/soup_bench.py and bench/soup_scale.py)
            self.row(f"uniform soup of {p['n_ckpt']} {p['model']} ckpts ({u['mb_per_file']:.0f} MB each, CPU "
                     f"float64, {default_threads()} accumulation threads) / raw read (page cache)",
                     f"{u['ratio']:.2f} ({u['soup_s']:.2f} s / {u['read_s']:.2f} s)",
                     "info (floor: the float64 accumulation)")
            n_batches = max(1, p["greedy_eval_images"] // p["eval_batch"])
            g = sb.time_greedy(folders, p["model"], p["img_size"], p["eval_batch"],
                               device="cuda" if self.cuda else "cpu", amp=self.cuda, n_batches=n_batches)
            self.row(f"greedy soup of {p['n_ckpt']} ckpts / sum of evaluate times (eval: {n_batches}x"
                     f"{p['eval_batch']} images on {'GPU bf16' if self.cuda else 'CPU'})",
                     f"{g['ratio']:.3f} ({g['total_s']:.1f} s / {g['eval_s']:.1f} s; "
                     f"{g['overhead_per_step_s'] * 1000:.0f} ms/step outside evaluate)", "<= 1.2")
        return {"write_s": write_s, "uniform": u, "greedy": g}

    def compile(self) -> dict:
        if not self.p["compile"]:
            print("# compile: off at these sizes (--smoke)", flush=True)
            return {"skipped": "smoke"}
        r = self.train_throughput(compile=True)
        bare = getattr(self, "bare_ips", None)
        measured = f"{r['images_per_s']:.0f} img/s (compile + warm-up epoch {r['warmup_s']:.0f} s)"
        if bare:
            r["speedup"] = r["images_per_s"] / bare
            measured = f"{r['speedup']:.2f}x eager ({r['images_per_s']:.0f} vs {bare:.0f} img/s; compile + " \
                       f"warm-up epoch {r['warmup_s']:.0f} s)"
        self.row(f"bare training with torch.compile, {self.p['model']} {self.p['img_size']}px ({self.device_name})",
                 measured, ">= 1.0x")
        fpi = getattr(self, "flops_per_img", None)
        if fpi and self.peak:
            r["mfu"] = fpi * r["images_per_s"] / self.peak
            self.row("model FLOP utilisation, compiled", f"{r['mfu']:.1%} "
                     f"({fpi * r['images_per_s'] / 1e12:.1f} TFLOP/s achieved)")
        return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on any device (tests)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"),
                    help="folder for gpu_results.json (default $OUT, else bench/out)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would not fit (seconds)")
    ap.add_argument("--skip", nargs="+", choices=SECTIONS, default=[])
    a = ap.parse_args(argv)

    import torch
    if not a.smoke and not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__} ({sys.executable}); run with --smoke for a CPU "
              f"smoke run", file=sys.stderr)
        return 2
    p = SMOKE if a.smoke else FULL
    b = Bench(p, Path(a.out), a.budget_s, a.smoke)
    print(f"# device: {b.device_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"python {sys.executable}; peak bf16 {b.peak / 1e12 if b.peak else 'unknown'} TFLOP/s", flush=True)
    if b.cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)  # a smoke run on a small, shared CPU box: 2+ threads mostly wait on each other
    for name in SECTIONS:
        if name not in a.skip:
            b.run(name, getattr(b, name))
    b.save()
    print("\nfigure | measured | goal")
    for row in b.rows:
        print(" | ".join(row))
    failed = [n for n, s in b.results["sections"].items() if "error" in s]
    print(f"\n(results in {Path(a.out) / 'gpu_results.json'}{'; failed: ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
