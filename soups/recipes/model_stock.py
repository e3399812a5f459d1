"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"): per tensor, the
average of the ingredients pulled toward the shared init by how much their deltas from it agree,
w = t·w_avg + (1-t)·w_init, t = N·cosθ / (1 + (N-1)·cosθ), cosθ the mean pairwise cosine of the deltas
(soups/average.ModelStockSum: streamed, memory flat in N; BN statistics as in the uniform soup).

Needs the anchor: the family's shared init, the `init` LoggedModel whose sha256 is the family's
ich.init_fingerprint (soups/pull.py finds it; a family without one gets a note instead). `--model-stock-k K`
soups only the family's K best ingredients by val (the paper uses 2 or 3); 0, the default, soups them all.
The soup records the spread of its per-tensor t as tags ich.model_stock.{t_min,t_median,t_mean,t_max,tensors,k}.
"""
from __future__ import annotations

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register


def cook(inputs: RecipeInputs) -> CookedSoup:
    from soups.average import ModelStockSum, prefetch
    from soups.options import SoupError

    k = inputs.opts.model_stock_k
    members = inputs.members[:k] if k else inputs.members  # best val first
    total, used = ModelStockSum(inputs.anchor, inputs.anchor_name), set()
    for p, sd in prefetch(inputs.ingredients(members), 1):
        total.add(sd, p.label)
        used.add(p.record.model_id)
        del sd
    if not used:
        raise SoupError(f"{inputs.family} model_stock: no usable ingredients")
    return CookedSoup(inputs.finish(total.result()), used, {}, params=t_summary(total.ratios(), k))


def t_summary(ratios: dict[str, float], k: int) -> dict[str, str]:
    """What the soup records of its per-tensor t (tags ich.model_stock.*): their spread over the tensors, and k."""
    ts = sorted(ratios.values())
    return {"k": str(k), "tensors": str(len(ts)), "t_min": f"{ts[0]:.6g}", "t_median": f"{ts[len(ts) // 2]:.6g}",
            "t_mean": f"{sum(ts) / len(ts):.6g}", "t_max": f"{ts[-1]:.6g}"} if ts else {"k": str(k), "tensors": "0"}


RECIPE = register(Recipe("model_stock", needs_anchor=True, cook=cook, style=("d", "#ff7f0e")))
