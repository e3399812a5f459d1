"""Weight averaging over streams of state dicts: the running sum (every uniform soup: soups/build.py, the trajectory
soup of sweeps/soup_objective.py), greedy selection, Model Stock (ModelStockSum: the soup pulled toward the
shared init) and WiSE-FT's interpolation between the shared init and a fine-tuned model (wise_ft).

Memory stays flat in the number of ingredients (docs/design.md#6): a float64 running sum, one candidate,
the ingredient in hand and at most `prefetch_depth` loaded ahead. Loading the next checkpoint runs in a
thread while the current candidate is evaluated.

The float64 accumulation is memory-bound (~110 ms per 107 MB coatnet_0 checkpoint on one core): with more than
one core it runs on several threads, each owning whole tensors (`threads`, default: the usable cores, at most 4).
Every element still sees the same float64 additions in the same order, so the soup is bitwise the same for any
number of threads.
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ich.checkpoint import first_nonfinite
from soups.compat import check_state_dicts_match

StateDict = dict[str, torch.Tensor]


_MIN_PARALLEL = 1 << 20  # elements: below this a state dict is summed on the calling thread
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def default_threads() -> int:
    """Threads for the accumulation: the cores this process may use, at most 4 (it is memory-bound)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="soups-sum")
        return _pools[threads]


def _by_key(keys: list[str], numel: Callable[[str], int], threads: int,
            fn: Callable[[str], Any]) -> dict[str, Any]:
    """{k: fn(k)}, the keys split over `threads` threads in shares of about equal size (largest first).
    fn must touch only what belongs to its key: that is what keeps any thread count bitwise equal."""
    total = sum(numel(k) for k in keys)
    if threads <= 1 or total < _MIN_PARALLEL or len(keys) < 2:
        return {k: fn(k) for k in keys}
    shares: list[list[str]] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for k in sorted(keys, key=numel, reverse=True):
        i = sizes.index(min(sizes))
        shares[i].append(k)
        sizes[i] += numel(k)
    futures = [_pool(threads).submit(lambda ks: {k: fn(k) for k in ks}, ks) for ks in shares if ks]
    out: dict[str, Any] = {}
    for f in futures:
        out.update(f.result())
    return {k: out[k] for k in keys}  # the caller's key order


class RunningSum:
    """Sum of state dicts in float64 (floating tensors only).

    Integer tensors (BatchNorm's int64 `num_batches_tracked`) are never averaged: the first ingredient's
    value is kept as-is. mean() and candidate_with() return tensors in the ingredients' original dtypes.
    threads: tensors are added on this many threads (default_threads() when None); the result does not
    depend on it.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.count = 0
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._sum: StateDict = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._ref_name = ""

    def _check(self, sd: StateDict, name: str) -> None:
        if self.count:
            check_state_dicts_match(self._sum, sd, name, ref_name=self._ref_name)

    def add(self, sd: StateDict, name: str = "ingredient") -> None:
        self._check(sd, name)
        numel = (lambda k: sd[k].numel())
        if self.count == 0:
            self._ref_name = name
            self._dtypes = {k: v.dtype for k, v in sd.items()}

            def first(k: str) -> torch.Tensor:
                v = sd[k]
                # copy=True: one new buffer that never aliases the caller's tensor (no extra clone)
                return v.detach().to(torch.float64 if v.is_floating_point() else v.dtype,
                                     memory_format=torch.contiguous_format, copy=True)
            self._sum = _by_key(list(sd), numel, self.threads, first)
        else:
            def add(k: str) -> None:
                v, s = sd[k], self._sum[k]
                if v.is_floating_point():
                    # in place, promoting on the fly: no float64 temporary of the ingredient
                    s.add_(v.detach() if v.device == s.device else v.detach().to(s.device))
            _by_key(list(sd), numel, self.threads, add)
        self.count += 1

    def _mean(self, extra: StateDict | None) -> StateDict:
        n = self.count + (extra is not None)

        def one(k: str) -> torch.Tensor:
            s = self._sum[k]
            if not s.is_floating_point():
                return s.clone()
            if extra is None:  # divide in float64, round once into the original dtype: no float64 temporary
                return torch.div(s, n, out=torch.empty(s.shape, dtype=self._dtypes[k], device=s.device))
            e = extra[k].detach()
            return _mean_with(s, e if e.device == s.device else e.to(s.device), n, self._dtypes[k])
        return _by_key(list(self._sum), lambda k: self._sum[k].numel(), self.threads, one)

    def mean(self) -> StateDict:
        if self.count == 0:
            raise ValueError("RunningSum.mean: no state dict added yet")
        return self._mean(None)

    def export(self) -> tuple[StateDict, dict[str, str], int]:
        """The float64 sums, the ingredients' dtype names and the count: what restore() needs to go on bitwise
        (a trial's running soup travels in its checkpoint this way, sweeps/soup_objective.py)."""
        return self._sum, {k: str(d).removeprefix("torch.") for k, d in self._dtypes.items()}, self.count

    @classmethod
    def restore(cls, sums: StateDict, dtypes: dict[str, str], count: int, name: str = "restored sum",
                threads: int | None = None) -> "RunningSum":
        if set(sums) != set(dtypes) or count < 1 or not all(isinstance(getattr(torch, d, None), torch.dtype)
                                                             for d in dtypes.values()):
            raise ValueError(f"{name}: not a saved running sum (keys, dtypes or count {count} do not fit)")
        out = cls(threads)
        out._sum, out.count, out._ref_name = dict(sums), int(count), name
        out._dtypes = {k: getattr(torch, d) for k, d in dtypes.items()}
        return out

    def candidate_with(self, sd: StateDict, name: str = "ingredient") -> StateDict:
        """(sum + sd) / (count + 1), without committing sd to the sum."""
        if self.count == 0:
            raise ValueError("RunningSum.candidate_with: no state dict added yet")
        self._check(sd, name)
        return self._mean(sd)


_CHUNK = 1 << 16  # float64 elements (512 KiB): a chunk stays in cache between the add and the divide


def _mean_with(s: torch.Tensor, e: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(s + e) / n rounded once into `dtype`, s float64. On CPU, large tensors go through a small reused float64
    buffer chunk by chunk instead of a float64 temporary the size of the tensor: about half the time for a
    coatnet_0 candidate (no 200 MB allocation and its page faults, the chunk stays in cache)."""
    out = torch.empty(s.shape, dtype=dtype, device=s.device)
    if s.device.type != "cpu" or s.numel() <= _CHUNK or not (s.is_contiguous() and e.is_contiguous()):
        return torch.div(torch.add(s, e), n, out=out)
    sf, ef, of = s.view(-1), e.view(-1), out.view(-1)
    buf = torch.empty(_CHUNK, dtype=torch.float64)
    for i in range(0, sf.numel(), _CHUNK):
        j = min(i + _CHUNK, sf.numel())
        torch.div(torch.add(sf[i:j], ef[i:j], out=buf[:j - i]), n, out=of[i:j])
    return out


BN_STATISTICS = ("running_mean", "running_var")  # float buffers the soups average like uniform, never pull to the init


def is_bn_statistic(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BN_STATISTICS


def model_stock_ratio(mean_cos: float, n: int) -> float:
    """Model Stock's interpolation ratio t = N·c / (1 + (N-1)·c) for N ingredients whose deltas from the init have
    mean pairwise cosine c (Jang et al. 2024, eq. 5). c is clamped to [0, 1]: the paper's angle lies in [0, π/2]
    (deltas of fine-tuned models from one init are never seen to point apart); below 0 the formula leaves [0, 1]
    and at c = -1/(N-1) divides by zero, so deltas that disagree give t = 0, the init. N = 1: no pair to measure
    an angle on, t = 1 (the one ingredient, as c = cos 0 = 1 would give)."""
    if n <= 1:
        return 1.0
    c = min(max(mean_cos, 0.0), 1.0)
    return n * c / (1 + (n - 1) * c)


class ModelStockSum:
    """Model Stock (Jang et al. 2024) over a stream of state dicts, memory flat in N: per floating tensor a float64
    sum of the weights (a RunningSum: uniform's own) and a sum, in the weights' precision, of the unit deltas
    u_i = d_i/|d_i|, d_i = w_i - w_init, from which the mean pairwise cosine needs no pair: sum_{i<j} cos_ij =
    (|sum u_i|^2 - M)/2,
    M the number of nonzero deltas. result(): per tensor w = w_init + t·(mean w - w_init), i.e.
    t·w_avg + (1-t)·w_init with t = model_stock_ratio(c, N).

    BatchNorm running statistics and integer tensors are what the uniform soup makes of them (the RunningSum's
    mean; num_batches_tracked: the first ingredient's). A zero delta (a tensor an ingredient left at the init, e.g. a
    frozen layer) has no direction: it counts as orthogonal to every other delta (u = 0, cos = 0), so it pulls t
    toward the init; a tensor no ingredient moved stays the init, with no division by zero.
    """

    def __init__(self, anchor: StateDict, anchor_name: str = "the shared init", threads: int | None = None) -> None:
        self.anchor, self.anchor_name = anchor, anchor_name
        self.total = RunningSum(threads)
        self._keys = [k for k, v in anchor.items() if v.is_floating_point() and not is_bn_statistic(k)]
        self._units: StateDict = {}
        self._moved: dict[str, int] = dict.fromkeys(self._keys, 0)

    @property
    def count(self) -> int:
        return self.total.count

    def add(self, sd: StateDict, name: str = "ingredient") -> None:
        check_state_dicts_match(self.anchor, sd, name, ref_name=self.anchor_name)
        self.total.add(sd, name)

        def unit(k: str) -> None:
            # In the weights' own precision: the delta (a float32 difference of nearby weights is exact or within an
            # ulp), its norm, and the sum of unit deltas (at most a few dozen terms of norm 1; only their angle is
            # read). Three passes over the tensor, no float64 copy: bench/model_stock_cost.py.
            d = torch.sub(sd[k].detach(), self.anchor[k].detach().to(sd[k].device))
            norm = float(torch.linalg.vector_norm(d))
            if k not in self._units:
                self._units[k] = torch.zeros_like(d)
            if norm > 0:
                self._units[k].add_(d, alpha=1.0 / norm)
                self._moved[k] += 1
        _by_key(self._keys, lambda k: sd[k].numel(), self.total.threads, unit)

    def mean_cosines(self) -> dict[str, float]:
        """Per tensor, the mean over the N(N-1)/2 pairs of ingredients of the cosine of their deltas (N >= 2)."""
        n = self.count
        if n < 2:
            raise ValueError(f"ModelStockSum: {n} state dict(s), no pair to measure an angle on")
        return {k: (float(self._units[k].to(torch.float64).square().sum()) - self._moved[k]) / (n * (n - 1))
                for k in self._keys}

    def ratios(self) -> dict[str, float]:
        """Per tensor, t (model_stock_ratio)."""
        if self.count == 1:
            return dict.fromkeys(self._keys, 1.0)
        return {k: model_stock_ratio(c, self.count) for k, c in self.mean_cosines().items()}

    def result(self) -> StateDict:
        if self.count == 0:
            raise ValueError("ModelStockSum.result: no state dict added yet")
        out, ratios = self.total.mean(), self.ratios()  # the mean: rounded once from the float64 sum
        for k, t in ratios.items():  # w_init + t·(mean - w_init) in the weights' precision (one pass; t = 0: the init)
            a = self.anchor[k].detach().to(device=out[k].device, dtype=out[k].dtype)
            out[k] = torch.lerp(a, out[k], t) if t else a.clone()  # a copy: the anchor is shared by every family
        return out


def wise_ft(init: StateDict, fine_tuned: StateDict, alpha: float, *, keep: Iterable[str] = (),
            init_name: str = "the shared init", name: str = "the fine-tuned model") -> StateDict:
    """WiSE-FT (Wortsman et al., CVPR 2022): w(α) = (1-α)·w_init + α·w_ft, tensor by tensor, as torch.lerp in the
    weights' own precision (float32, float64; half types through float32, rounded once): within an ulp of the
    float64 formula, and about 5x faster than going through float64 (bench/wise_ft_cost.py). Floating buffers
    (BatchNorm's running statistics) are interpolated like the weights, as the uniform soup averages them; integer
    tensors (num_batches_tracked) cannot be, so they are the nearer endpoint's (the init's for α < 0.5, as the
    uniform soup keeps one ingredient's). `keep`: keys that stay
    w_ft's whatever α (the classifier head, by default: soups/recipes/wise_ft.py). α = 0 and α = 1 are the
    endpoints themselves (copies), bitwise; any other α in [0, 1] is the formula."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT alpha {alpha}: must lie in [0, 1]")
    check_state_dicts_match(init, fine_tuned, name, ref_name=init_name)
    keep = set(keep)
    unknown = sorted(keep - fine_tuned.keys())
    if unknown:
        raise ValueError(f"WiSE-FT keep: {unknown[0]!r} is not a key of {name}")
    out: StateDict = {}
    for k, ft in fine_tuned.items():
        a = init[k].detach()
        ft = ft.detach()
        if k in keep or alpha == 1.0 or (not ft.is_floating_point() and alpha >= 0.5):
            out[k] = ft.clone()
        elif alpha == 0.0 or not ft.is_floating_point():
            out[k] = a.to(ft.device, ft.dtype if ft.is_floating_point() else a.dtype, copy=True)
        elif ft.dtype in (torch.float32, torch.float64):
            out[k] = torch.lerp(a.to(ft.device, ft.dtype), ft, alpha)
        else:
            out[k] = torch.lerp(a.to(ft.device, torch.float32), ft.float(), alpha).to(ft.dtype)
    return out


@dataclass
class Ingredient:
    """One checkpoint offered to a soup: its name, its val score (used to sort), and its weights
    as a state dict or a zero-argument callable that loads them (so loading can be lazy and prefetched)."""
    name: str
    score: float
    load: Callable[[], StateDict] | StateDict

    def state_dict(self) -> StateDict:
        return self.load() if callable(self.load) else self.load


@dataclass
class Skipped:
    name: str
    reason: str


def nonfinite_reason(ing: Ingredient, sd: StateDict) -> str | None:
    """Why an ingredient must be skipped (NaN/Inf score or weights), else None."""
    if not math.isfinite(ing.score):
        return f"val score is {ing.score}"
    if all_finite(sd):
        return None
    bad = first_nonfinite(sd)
    return None if bad is None else f"tensor {bad} holds NaN/Inf"


def all_finite(sd: StateDict) -> bool:
    """True when no floating tensor holds NaN/Inf (a fast test; False may also mean an overflowing sum).

    One sum per tensor in its own dtype: any NaN/Inf element makes the sum NaN/Inf. A finite tensor whose sum
    overflows also answers False, so callers confirm with first_nonfinite(). About 20x cheaper than
    torch.isfinite(v).all(), which allocates a bool tensor the size of the weights (coatnet_0: 4 ms vs 80 ms)."""
    for v in sd.values():
        if v.is_floating_point() and v.numel() and not math.isfinite(v.detach().sum()):
            return False
    return True


def _warn_skip(s: Skipped) -> None:
    warnings.warn(f"skipping checkpoint {s.name}: {s.reason}", RuntimeWarning, stacklevel=3)


def prefetch(iterable: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate `iterable` in a background thread, producing at most `depth` items ahead of the consumer.

    While the consumer works on item k, item k+1 is being produced (e.g. a checkpoint downloaded and loaded).
    An exception raised by the producer is re-raised in the consumer at the point it would have occurred.
    depth=0 iterates in the caller's thread.
    """
    if depth <= 0:
        yield from iterable
        return
    slots = threading.Semaphore(depth)
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            it = iter(iterable)
            while True:
                while not slots.acquire(timeout=0.1):  # wait for the consumer to take an item
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    q.put((done, None))
                    return
                q.put((item, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=produce, name="soups-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            slots.release()  # the consumer now holds this item: the producer may load the next
            yield item
            del item  # do not keep the previous item alive while waiting for the next
    finally:
        stop.set()
        thread.join(timeout=5)


def prefetch_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int = 2,
                 depth: int = 2) -> Iterator[Any]:
    """fn(item) for every item, in order, computed on `workers` threads while the consumer works.

    At most `depth` items are in flight (started, or done and waiting) besides the one the consumer holds, so
    memory stays flat in the number of items. For downloads: the next ones arrive while the current one is
    verified and averaged. An exception of fn is raised in the consumer when it reaches that item."""
    it = iter(items)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="soups-fetch") as pool:
        try:
            for item in itertools.islice(it, max(1, depth)):
                pending.append(pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(it, 1):  # keep `depth` in flight while the consumer works
                    pending.append(pool.submit(fn, item))
                yield result
                del result
        finally:
            for f in pending:
                f.cancel()


def _loaded(ingredients: Iterable[Ingredient], depth: int,
            check: bool) -> Iterator[tuple[Ingredient, StateDict, str | None]]:
    """(ingredient, state dict, why it must be skipped or None). Loading and the NaN/Inf check run in the
    prefetch thread, so both overlap the consumer's averaging and evaluation."""
    def load(ing: Ingredient) -> tuple[Ingredient, StateDict, str | None]:
        sd = ing.state_dict()
        return ing, sd, nonfinite_reason(ing, sd) if check else None
    return prefetch((load(ing) for ing in ingredients), depth)


@dataclass
class GreedyStep:
    name: str
    ingredient_score: float  # the ingredient's own val score, as given (used for sorting)
    candidate_score: float  # evaluate() of the candidate soup with this ingredient added
    accepted: bool
    soup_score_after: float  # best score so far, after deciding on this ingredient


@dataclass
class GreedyResult:
    state_dict: StateDict
    accepted: list[str]
    steps: list[GreedyStep]
    best_score: float
    skipped: list[Skipped] = field(default_factory=list)


def improves(cur: float, best: float, *, higher_is_better: bool = True, tie_rule: str = "accept",
             tol: float = 1e-7) -> bool:
    """Greedy acceptance. 'accept' (the paper's code): cur + tol > best, so ties are kept.
    'strict' (model-soups reference): cur > best. For a loss the comparisons are mirrored."""
    if tie_rule not in ("accept", "strict"):
        raise ValueError(f"tie_rule must be 'accept' or 'strict', got {tie_rule!r}")
    if not math.isfinite(cur):
        return False
    if higher_is_better:
        return cur + tol > best if tie_rule == "accept" else cur > best
    return cur - tol < best if tie_rule == "accept" else cur < best


def greedy_soup(ingredients: Iterable[Ingredient], evaluate: Callable[[StateDict], float], *,
                higher_is_better: bool = True, tie_rule: str = "accept", tol: float = 1e-7,
                skip_nonfinite: bool = True, prefetch_depth: int = 1, threads: int | None = None,
                on_skip: Callable[[Skipped], None] = _warn_skip) -> GreedyResult:
    """Greedy soup (Wortsman et al. 2022) over ingredients sorted best-first by their val score.

    Starts from the first usable ingredient; each next one is tried as (soup*n + new)/(n+1) and kept when
    evaluate() of the candidate does not drop (see improves()). Every compared score, the first
    ingredient's included, comes from `evaluate`, so all comparisons use the same evaluator.
    """
    improves(0.0, 0.0, tie_rule=tie_rule)  # validate tie_rule before loading anything
    soup, steps, accepted, skipped = RunningSum(threads), [], [], []
    best = math.nan
    prev: Ingredient | None = None
    for ing, sd, reason in _loaded(ingredients, prefetch_depth, skip_nonfinite):
        if prev is not None and math.isfinite(prev.score) and math.isfinite(ing.score):
            out_of_order = ing.score > prev.score if higher_is_better else ing.score < prev.score
            if out_of_order:
                raise ValueError(f"greedy soup: ingredients not sorted best-first: {ing.name} ({ing.score}) "
                                 f"comes after {prev.name} ({prev.score})")
        prev = ing
        if reason is not None:
            skipped.append(Skipped(ing.name, reason))
            on_skip(skipped[-1])
            continue
        if soup.count == 0:
            soup.add(sd, ing.name)
            best = float(evaluate(soup.mean()))
            steps.append(GreedyStep(ing.name, ing.score, best, True, best))
            accepted.append(ing.name)
            continue
        candidate = soup.candidate_with(sd, ing.name)
        cur = float(evaluate(candidate))
        del candidate
        keep = improves(cur, best, higher_is_better=higher_is_better, tie_rule=tie_rule, tol=tol)
        if keep:
            soup.add(sd, ing.name)
            accepted.append(ing.name)
            best = cur
        steps.append(GreedyStep(ing.name, ing.score, cur, keep, best))
        del sd
    if soup.count == 0:
        raise ValueError(f"greedy soup: no usable ingredients (skipped: {[s.name for s in skipped]})")
    return GreedyResult(soup.mean(), accepted, steps, best, skipped)
