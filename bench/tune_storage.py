"""What Tune's storage holds per epoch, and whether it needs the weights (issue 20, item 1).

A trial's Tune checkpoint is the epoch's checkpoint folder: the weights (model.safetensors, also logged to
MLflow) and the training state exact resume needs (AdamW's two moments per parameter, counters, scaler).
This measures, for the demo's tiny CoAtNet and for coatnet_0 at 224 px (17 classes), the bytes and the write
time of each part, side by side in one run, and the share the weights are of Tune's copy.

    python bench/tune_storage.py [--out bench/out/tune_storage.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ich.models import create_model  # noqa: E402


def write_s(tensors: dict, path: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        save_file(tensors, str(path))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, img_size: int, num_classes: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes, img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 3, img_size, img_size)).sum().backward()  # one step: AdamW's state exists
    opt.step()
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state = {f"opt.{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
             for pid, st in opt.state_dict()["state"].items() for k, v in st.items()}
    with tempfile.TemporaryDirectory() as d:
        w_path, s_path = Path(d) / "model.safetensors", Path(d) / "train_state.safetensors"
        w_s, s_s = write_s(weights, w_path), write_s(state, s_path)
        w_b, s_b = w_path.stat().st_size, s_path.stat().st_size
    return {"model": name, "img_size": img_size, "weights_mb": w_b / 1e6, "train_state_mb": s_b / 1e6,
            "weights_share_of_tune_copy": w_b / (w_b + s_b), "weights_write_s": w_s, "train_state_write_s": s_s,
            "tune_copy_with_weights_mb": (w_b + s_b) / 1e6, "tune_copy_without_weights_mb": s_b / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "tune_storage.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure("coatnet_tiny_ich", 32, 10), measure("coatnet_0_rw_224", 224, 17)]
    for r in rows:
        print(f"{r['model']:<18} weights {r['weights_mb']:7.1f} MB ({r['weights_write_s']:.3f} s)  train state "
              f"{r['train_state_mb']:7.1f} MB ({r['train_state_write_s']:.3f} s)  weights = "
              f"{r['weights_share_of_tune_copy']:.0%} of Tune's copy")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
