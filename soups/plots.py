"""Plots of soups (matplotlib, Agg backend: no display on workers or in tests)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ingredient_curve(path: str | Path, rows: list[dict], *, metric: str, title: str, soup_val: float,
                     uniform_val: float | None = None) -> Path:
    """Ingredients in greedy order (best val first): each one's own val score, and for greedy soups the
    candidate soup's val score after trying it (filled = accepted, hollow = rejected)."""
    path = Path(path)
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 3), 3.6), dpi=110)
    ax.plot(x, [r["val_score"] for r in rows], "o-", color="#999999", ms=4, lw=1, label="ingredient alone")
    tried = [(i, r) for i, r in zip(x, rows) if r.get("candidate_val") is not None]
    if tried:
        ax.plot([i for i, _ in tried], [r["candidate_val"] for _, r in tried], "-", color="#1f77b4", lw=1)
        for i, r in tried:
            ax.plot(i, r["candidate_val"], "o", ms=7, color="#1f77b4",
                    mfc="#1f77b4" if r["accepted"] else "white")
        ax.plot([], [], "o", color="#1f77b4", label="soup after try: accepted")
        ax.plot([], [], "o", color="#1f77b4", mfc="white", label="rejected")
    ax.axhline(soup_val, color="#d62728", lw=1.2, ls="--", label=f"soup {soup_val:.4f}")
    if uniform_val is not None:
        ax.axhline(uniform_val, color="#2ca02c", lw=1, ls=":", label=f"uniform {uniform_val:.4f}")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['trial'][:8]}\ne{r['epoch']}" for r in rows], fontsize=7)
    ax.set_ylabel(f"val {metric}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
