"""`ich report`: build the report (soups/report/build.py) and print its table's summary to the terminal."""
from __future__ import annotations

import argparse

from soups.report.build import build_report
from soups.report.sections import table_lines, table_metrics
from soups.stats import interval_metrics


def print_summary(summary: dict) -> None:
    header, lines = table_lines(summary["table"], summary["metric"])
    shown, paired = table_metrics(), interval_metrics()
    # model, the interval metrics (accuracy, F1), the first Δ (Δacc), McNemar p: what fits a terminal
    keep = [0, *(3 + shown.index(m) for m in paired), 3 + len(shown), len(header) - 1]
    widths = [max(len(row[i]) for row in [header] + lines) for i in keep]
    for row in [header] + lines:
        print("  ".join(row[i].ljust(w) for i, w in zip(keep, widths)))
    bv = summary["bias_variance"]
    if bv:
        for g in bv["groups"]:
            print(f"{g['label']:<24} CE bias² {g['ce']['bias2']:.4f} var {g['ce']['variance']:.4f}   "
                  f"0-1 bias {g['zero_one']['bias']:.4f} var {g['zero_one']['variance']:.4f}")
    for note in summary["notes"]:
        print(f"note: {note}")
    c = summary["counts"]
    print(f"report run {summary['run_id']} ({c['computed']} models run, {c['from_cache']} from cache, "
          f"{summary['seconds']} s); files in {summary['out_dir']}", flush=True)


def cmd_report(args: argparse.Namespace) -> None:
    """`ich report`: bad input exits 2 with one line."""
    from ich.errors import exit_on_user_error
    from ich.home import ich_home
    out = args.out or str(ich_home() / "reports" / args.experiment)
    with exit_on_user_error("ich report"):
        summary = build_report(args.experiment, out, data=args.data, split_for_table=args.split_for_table,
                               n_resamples=args.n_resamples, device=args.device, metric=args.metric,
                               registered_model=getattr(args, "registered_model", None),
                               optuna_storage=getattr(args, "optuna_storage", None))
    print_summary(summary)
