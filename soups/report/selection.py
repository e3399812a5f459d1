"""The report's selection, by recorded val metrics only (test is only reported): the usable checkpoints and soups,
the best single of each baseline family, one `Block` per CoAtNet architecture (best single, best soup of each
recipe, soft voting of their ingredients), the focus block of the figures, and the champion shown."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from soups import recipes
from soups.champion import ALIAS
from soups.report.snapshot import Candidate, Snapshot, _best
from soups.store.tags import GC_DELETED, TAG_GC


def _usable(records, kind: str, key: str, fingerprint: str, notes: list[str]) -> list[Candidate]:
    """Records built on this dataset with a finite val figure; the rest are counted in one note per reason."""
    out, skipped = [], {}
    for r in records:
        score = r.metrics.get(key)
        if r.dataset_fingerprint != fingerprint:
            reason = "built on another dataset"
        elif r.tags.get(TAG_GC) == GC_DELETED:  # the record stays, its weights were deleted by `ich gc`
            reason = "weights deleted by ich gc"
        elif score is None or not math.isfinite(score):
            reason = f"no finite {key} recorded"
        else:
            out.append(Candidate(r, kind, float(score)))
            continue
        skipped.setdefault(reason, []).append(r)
    for reason, rs in skipped.items():
        notes.append(f"skipped {len(rs)} {kind}(s), {reason}: e.g. {rs[0].label()}")
    return out


def arch_name(architecture: str) -> str:
    """The paper's name of a CoAtNet: coatnet_0_rw_224 -> CoAtNet-0, coatnet_tiny_ich -> CoAtNet-tiny."""
    parts = architecture.split("_")
    if parts[0] != "coatnet":
        return architecture
    size = [p for p in parts[1:] if p not in ("rw", "ich") and not (p.isdigit() and int(p) >= 32)]  # 224: img size
    return "-".join(["CoAtNet", *size])


@dataclass
class Block:
    """One CoAtNet architecture's rows of the table, as the paper has them: its best single checkpoint, then its
    best uniform and best greedy soup (the soup trial's within-trajectory soups and the across-run soups compete,
    by val), then soft voting of each soup's ingredients."""
    architecture: str
    best: Candidate
    soups: dict[str, Candidate]  # recipe -> the best soup of that recipe, by val
    soup_trial: str | None  # the trial whose within-trajectory soups compete: the best single's, else the best souped
    within: dict[str, Candidate] = field(default_factory=dict)  # recipe -> that trial's within soup (its trajectory)
    pool: list[Candidate] = field(default_factory=list)  # every checkpoint of this architecture (val vs test)


@dataclass
class Selection:
    """What the report shows, chosen by val: every field names models by their registry records."""
    best: Candidate  # best single CoAtNet of any architecture
    baselines: dict[str, Candidate]  # family -> best checkpoint of that family
    blocks: list[Block]  # one per CoAtNet architecture, by architecture name
    ingredients: dict[str, list[Candidate]]  # soup model id -> its recorded ingredients (soft voting, MDS)
    focus: Block  # the block of the best soup by val (else of the best single): val vs test, MDS, bias-variance
    mds_soup: Candidate | None  # the best soup by val with usable ingredients: the MDS shows its ingredients
    bias_variance: list[dict]  # focus architecture, per souped trial: {"trial", "single", <recipe>: its soup...}


def _block(arch: str, checkpoints: list[Candidate], soups: list[Candidate], metric: str, notes: list[str]) -> Block:
    pool = [c for c in checkpoints if c.record.architecture == arch]
    best = _best(pool, metric)
    soups = [s for s in soups if s.record.architecture == arch]
    # Within-trajectory soups of the best trial; if it has none (stopped after one epoch), the best trial that has.
    within = [s for s in soups if s.scope == "within"]
    soup_trial = best.record.trial
    if within and not any(s.record.trial == soup_trial for s in within):
        soup_trial = _best(within, metric).record.trial
        notes.append(f"{arch}: trial {best.record.trial} of its best single has no within-trajectory soup; its "
                     f"within soups are those of trial {soup_trial}, the best trial that has one")
    mine = [s for s in within if s.record.trial == soup_trial]
    block = Block(arch, best, {}, soup_trial if mine else None, pool=pool)
    for recipe in recipes.names():
        if (w := _best([s for s in mine if s.recipe == recipe], metric)) is not None:
            block.within[recipe] = w
        competing = [s for s in mine if s.recipe == recipe] + [s for s in soups if s.scope == "across"
                                                                 and s.recipe == recipe]
        if competing:
            block.soups[recipe] = _best(competing, metric)
        else:
            needs = "; it needs the sweep's shared init logged as an `init` model" if recipes.get(recipe).needs_anchor \
                else ""
            notes.append(f"no {recipe} soup of {arch} in MLflow (run `ich soup` first{needs})")
    return block


def select(checkpoints: list[Candidate], soups: list[Candidate], metric: str, ingredients_of, notes: list[str]) -> Selection:
    coatnets = [c for c in checkpoints if c.family == "coatnet"]
    best = _best(coatnets, metric)
    baselines = {}
    for fam in sorted({c.family for c in checkpoints} - {"coatnet"}):
        baselines[fam] = _best([c for c in checkpoints if c.family == fam], metric)
    blocks = [_block(arch, coatnets, soups, metric, notes) for arch in sorted({c.record.architecture for c in coatnets})]
    by_id = {c.id: c for c in checkpoints}

    ingredients: dict[str, list[Candidate]] = {}
    for soup in {s.id: s for b in blocks for s in (*b.soups.values(), *b.within.values())}.values():
        ids = ingredients_of(soup) or []
        missing = [i for i in ids if i not in by_id]
        if not ids or missing:
            notes.append(f"soup {soup.record.name} ({soup.id}): ingredients {missing or ids} are not usable "
                         "checkpoints of this dataset; no soft-voting row for it")
            continue
        ingredients[soup.id] = [by_id[i] for i in ids]

    # The soup analyses follow the best soup by val (the paper's figure shows its ingredients).
    mds_soup = _best([s for b in blocks for s in b.soups.values() if s.id in ingredients], metric)
    arch = mds_soup.record.architecture if mds_soup else best.record.architecture
    focus = next(b for b in blocks if b.architecture == arch)

    spread = []
    within = [s for s in soups if s.scope == "within" and s.record.architecture == arch]
    souped = [r for r in recipes.names() if any(s.recipe == r for s in within)]  # the recipes this sweep cooked
    for trial in sorted({s.record.trial for s in within}):
        mine = [s for s in within if s.record.trial == trial]
        by_recipe = {r: _best([s for s in mine if s.recipe == r], metric) for r in souped}
        single = _best([c for c in focus.pool if c.record.trial == trial], metric)
        if souped and all(by_recipe.values()) and single:
            spread.append({"trial": trial, "single": single, **by_recipe})
    return Selection(best, baselines, blocks, ingredients, focus, mds_soup, spread)


def _champion(snap: Snapshot, sel: Selection, soups: list[Candidate], metric: str, fingerprint: str,
              notes: list[str]) -> tuple[Candidate, str]:
    """The champion alias's soup when it is usable here; else the best soup; else the best single."""
    ref, name = snap.champion, snap.registered_model
    if ref is not None:
        known = {s.id: s for s in soups}
        if ref.model_id in known:
            return known[ref.model_id], f"alias {ALIAS} of {name} (v{ref.version})"
        if ref.record is not None and ref.record.dataset_fingerprint == fingerprint:
            return (Candidate(ref.record, "soup", ref.record.metrics.get(f"val_{metric}", float("nan"))),
                    f"alias {ALIAS} of {name} (v{ref.version})")
        notes.append(f"alias {ALIAS} of {name} (v{ref.version}) points at no usable soup of this dataset")
    best_soup = _best([s for s in soups if s.record.architecture == sel.best.record.architecture], metric)
    if best_soup is not None:
        return best_soup, f"best soup by val {metric} (no {ALIAS} alias on {name})"
    return sel.best, f"best single CoAtNet by val {metric} (no soups)"
