"""Learned soup (Wortsman et al., ICML 2022, "Model soups", §3.3 and appendix: "learned soup"): mixing
coefficients fitted by gradient descent, w = Σ_i c_i·w_i with c = softmax(z) over the ingredients, one z per
ingredient (`--learned-by model`) or per ingredient and tensor (`--learned-by layer`, the paper's "by layer").

- Fitted on one half of val, chosen on the other: val is split in two halves, stratified by class and fixed by
  `--learned-seed`. Adam on z minimises the cross-entropy of the mixed model on the fit half
  (torch.func.functional_call: the weights are a function of z, no model copy per step); every `EVAL_EVERY` steps
  the coefficients are scored on the held-out half by the selection metric, and the best scoring ones are kept
  (step 0 is the uniform soup: z = 0; ties go to the earlier step). Test is never seen. The soup's val figures
  cover the whole val, half of which fitted it (docs/design.md#15): its held-out score is logged beside them
  (ich.learned.heldout_<metric>) so it can be compared where it was not fitted.
- Memory: the ingredients are held at once (K state dicts, mixed in place: no stacked copy), so at most
  `--learned-max` (default 16) of them, the best by val; one line says so when the cap applies.
- BatchNorm running statistics are mixed with the same coefficients as their layer's weights; integer buffers
  (num_batches_tracked) are the best ingredient's. The BN option (auto/recalibrate) is applied once, to the result.
- Deterministic for a seed on one device: the halves, z's start (zeros) and the batch order are fixed, and on CPU
  the fit runs on one thread (a Ray task and the driver run with different thread counts, and a sum split over
  threads rounds differently).
"""
from __future__ import annotations

import sys

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register

NAME = "learned"
EVAL_EVERY = 5  # steps between held-out scorings (the points of the ich.learned.heldout_curve tag)


def split_halves(labels, seed: int):
    """Val indices -> (fit, held_out): per class, a seeded permutation dealt alternately, so both halves hold every
    class that has two or more images. numpy arrays of indices, sorted."""
    import numpy as np
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fit.extend(idx[0::2])
        held.extend(idx[1::2])
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def stack_ingredients(state_dicts: list[dict]) -> tuple[list[str], dict, dict]:
    """(mixed keys in order, {key: [K float tensors]} for floating tensors, {key: tensor} for the rest, taken from the
    first (best) ingredient). The lists hold the ingredients' own tensors, no copy (a float32 tensor's .float() is
    itself): the soup's memory is the ingredients once. All ingredients must hold the same keys and shapes (checked
    on pull: one family shares an architecture)."""
    import torch
    first = state_dicts[0]
    keys = [k for k, v in first.items() if torch.is_floating_point(v)]
    fixed = {k: v for k, v in first.items() if not torch.is_floating_point(v)}
    return keys, {k: [sd[k].float() for sd in state_dicts] for k in keys}, fixed


def coefficients(z):
    """softmax over the ingredients (dim 0): every column sums to 1."""
    return z.softmax(dim=0)


def mix(keys: list[str], stacks: dict, fixed: dict, c, dtypes: dict | None = None, buffers=()) -> dict:
    """Σ_i c[i, l]·w_i[l] per tensor l (c: [K, 1] by model, [K, L] by layer, L = len(keys)), plus the fixed tensors;
    differentiable in c, but for the keys in `buffers` (BN running statistics: torch refuses a gradient through
    them). dtypes: cast each mixed tensor back (the ingredients' dtypes) when given."""
    out = dict(fixed)
    for l, k in enumerate(keys):
        col = (c.detach() if k in buffers else c)[:, l if c.shape[1] > 1 else 0]
        v = sum(col[i] * t for i, t in enumerate(stacks[k]))
        out[k] = v.to(dtypes[k]) if dtypes else v
    return out


def fit(model, state_dicts: list[dict], batches_fit, held_out_score, *, by: str, steps: int, lr: float,
        seed: int, device=None) -> tuple[dict, dict]:
    """Fit the coefficients; returns (the chosen soup's state dict, info) where info holds the chosen step, the
    coefficients [K, L] as a list, and the curve of held-out scores by step.

    batches_fit(): an iterable of (inputs, labels) tensors, the fit half (called once per step, in a fixed order);
    held_out_score(state dict) -> float, higher better (the caller negates a lower-is-better metric)."""
    import torch

    dtypes = {k: v.dtype for k, v in state_dicts[0].items()}
    keys, stacks, fixed = stack_ingredients(state_dicts)
    if device is not None:
        stacks = {k: [t.to(device) for t in v] for k, v in stacks.items()}
        fixed = {k: v.to(device) for k, v in fixed.items()}
    threads = torch.get_num_threads()
    if device is None or torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _fit(model, keys, stacks, fixed, dtypes, batches_fit, held_out_score, k_count=len(state_dicts), by=by,
                    steps=steps, lr=lr, seed=seed, device=device)
    finally:
        torch.set_num_threads(threads)


def _fit(model, keys, stacks, fixed, dtypes, batches_fit, held_out_score, *, k_count, by, steps, lr, seed, device):
    import torch
    from torch.func import functional_call

    torch.manual_seed(seed)
    z = torch.zeros(k_count, len(keys) if by == "layer" else 1, device=device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    model.eval()  # BN uses the mixed running statistics, as the soup will
    buffers = {name for name, _ in model.named_buffers()}

    def current() -> dict:
        with torch.no_grad():
            return mix(keys, stacks, fixed, coefficients(z), dtypes)

    best = (held_out_score(current()), 0, coefficients(z).detach().clone())
    curve = [(0, best[0])]
    for step in range(1, steps + 1):
        for x, y in batches_fit():
            opt.zero_grad(set_to_none=True)
            params = mix(keys, stacks, fixed, coefficients(z), buffers=buffers)
            loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
            loss.backward()
            opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            score = held_out_score(current())
            curve.append((step, score))
            if score > best[0]:  # ties: the earlier step
                best = (score, step, coefficients(z).detach().clone())
    chosen = mix(keys, stacks, fixed, best[2], dtypes)
    chosen = {k: v.detach().cpu().clone() for k, v in chosen.items()}
    return chosen, {"step": best[1], "coefficients": best[2].cpu().tolist(), "curve": curve, "keys": keys}


def cook(inputs: RecipeInputs) -> CookedSoup:
    import numpy as np
    import torch

    from soups.evaluate import get_metric, higher_is_better
    from soups.options import SoupError

    ev, opts = inputs.evaluator, inputs.opts
    cap = opts.learned_max
    members = inputs.members[:cap]  # best val first
    if len(inputs.members) > cap:
        print(f"{inputs.family} {NAME}: holding the {cap} best of {len(inputs.members)} ingredients by val "
              f"(--learned-max {cap})", file=sys.stderr)
    state_dicts, used = [], []
    for p, sd in inputs.ingredients(members):
        state_dicts.append(sd)
        used.append(p.record.model_id)
    if not state_dicts:
        raise SoupError(f"{inputs.family} {NAME}: no usable ingredients")

    val = ev.data.splits["val"]
    labels = np.asarray(ev.labels("val"))
    fit_idx, held_idx = split_halves(labels, opts.learned_seed)
    if len(fit_idx) == 0 or len(held_idx) == 0:
        raise SoupError(f"{inputs.family} {NAME}: val holds {len(labels)} image(s), too few to fit on one half and "
                        "choose on the other")
    metric = get_metric(opts.metric)
    sign = 1.0 if higher_is_better(opts.metric) else -1.0
    num_classes = ev.data.num_classes
    fit_images, fit_labels = val.images[fit_idx], torch.from_numpy(labels[fit_idx]).long().to(ev.device)
    order = np.random.default_rng(opts.learned_seed).permutation(len(fit_idx))
    bs = ev.batch_size

    def batches_fit():
        for i in range(0, len(order), bs):
            sel = np.sort(order[i:i + bs])
            yield next(ev._batches(fit_images[sel])), fit_labels[sel]

    def held_out_score(sd: dict) -> float:
        ev.load(sd)
        with torch.no_grad():
            logits = np.concatenate([ev.model(x).float().cpu().numpy() for x in ev._batches(val.images[held_idx])])
        return sign * metric.value(logits, labels[held_idx], num_classes)

    chosen, info = fit(ev.model, state_dicts, batches_fit, held_out_score, by=opts.learned_by,
                       steps=opts.learned_steps, lr=opts.learned_lr, seed=opts.learned_seed, device=ev.device)
    del state_dicts
    coef = np.asarray(info["coefficients"])  # [K, 1] or [K, L]
    per_model = coef.mean(axis=1)
    held_score = sign * max(s for _, s in info["curve"])
    params = {"by": opts.learned_by, "step": str(info["step"]), "steps": str(opts.learned_steps),
              "seed": str(opts.learned_seed), "held": f"{len(used)} of {len(inputs.members)}",
              "coefficients": ",".join(f"{m}:{c:.6f}" for m, c in zip(used, per_model)),
              f"heldout_{opts.metric}": f"{held_score:.6g}", "val_split": f"fit {len(fit_idx)}, held out {len(held_idx)}"}
    if opts.learned_by == "layer":
        params["coefficient_range"] = f"{coef.min():.4f}..{coef.max():.4f}"
    params["heldout_curve"] = ",".join(f"{s}:{sign * v:.4g}" for s, v in info["curve"])
    return CookedSoup(inputs.finish(chosen), set(used), {}, params=params)


RECIPE = register(Recipe(NAME, needs_anchor=False, cook=cook, style=("P", "#8c564b")))
