"""Token budgets per (scale, layer) for a target ``kv_budget``: the ``KVPlan`` of each policy.

``kv_budget`` is a fraction with the paper's meaning: the average number of tokens a layer
retains is ``U = round(kv_budget * T)``, where ``T`` is the number of tokens cached just before
the final scale (VAR-256: 424 of 680). Leading scales stay whole while their cumulative cache
fits in ``U``; from the first scale whose cache exceeds ``U`` on, every scale keeps exactly
``layers * U`` tokens in total, split between layers according to the policy:

- ``uniform_plan`` (sliding, streaming, h2o, snapkv): every layer keeps ``U``.
- ``pyramid_plan`` (pyramidkv): linearly decreasing with depth, mean ``U``.
- ``scalekv_plan``: per scale, the profile's drafters keep (nearly) all they have and refiners
  share the rest, each keeping at least ``window_size`` tokens (whatever the page size);
  optionally the paper's linearly decaying refiner budget (``delta``). ``drafter_mode``
  ("calibrated", "sticky", "fixed") decides whether the drafter set may move between layers
  from one compressed scale to the next (``memory.profile.normalize_drafters``).

A layer can never keep more than it holds: its history plus the current scale. Whatever one
layer cannot take is handed to the others (water filling), so the total stays exact. ``align``
hands out tokens in whole pages where possible in the splits that are unequal by design
(scalekv, pyramidkv), which makes their page count (what the pool actually pays) close to
``layers * U / block_size`` instead of paying a partial page per layer; the uniform baselines
keep exactly U per layer, as defined. Nothing is kept after the last scale.

A schedule entry is a square scale's side (VAR's ``patch_nums``) or an ``(h, w)`` pair
(Infinity's non-square aspect ratios); ``scale_tokens`` counts either.

``capacity_plan`` replays a profile's per-(scale, layer) capacities instead of computing a
split (a budget file imported from the ScaleKV release, ``memory.profile_import``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .manager import KVPlan
from .profile import DRAFTER_MODES, ScaleProfile, normalize_drafters
from .water_fill import fill_up, water_fill

__all__ = [
    "BudgetSettings",
    "LayerwisePlan",
    "budget_plan",
    "capacity_plan",
    "check_plan",
    "compressed_scales",
    "cumulative_lengths",
    "pyramid_plan",
    "reference_length",
    "scale_tokens",
    "scalekv_plan",
    "uniform_plan",
    "uniform_tokens",
    "water_fill",
]


@dataclass(frozen=True)
class BudgetSettings:
    """Knobs of the budget split (shared by every policy so that comparisons are fair)."""

    kv_budget: float = 0.1
    window_size: int = 16  # refiners (and pyramid's deepest layers) keep at least this many tokens
    delta: float | None = None  # scalekv: refiner budget U - delta * j at the j-th compressed scale
    pyramid_beta: float = 20.0  # pyramidkv: the last layer gets U / beta (at least window_size)
    align: int = 1  # hand out tokens in multiples of this (the pool's block_size)
    # scalekv: how the profile's drafters are used at the compressed scales (None: the named
    # policy's default, see memory.policies.POLICY_DEFAULTS): calibrated | sticky | fixed
    drafter_mode: str | None = None
    num_drafters: int | None = None  # drafter_mode "fixed": how many (None: mean per scale)
    # scalekv: cap every step's KV peak (pages held at any moment + the step's scratch) at this
    # fraction of full's; None: the paper's plan (exactly layers * U kept at every compressed scale)
    peak_limit: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.kv_budget <= 1:
            raise ValueError(f"kv_budget: must be a fraction in (0, 1], got {self.kv_budget}")
        if self.window_size < 1:
            raise ValueError(f"window_size: must be >= 1, got {self.window_size}")
        if self.delta is not None and self.delta < 0:
            raise ValueError(f"delta: must be >= 0 (or None for drafters-keep-all), got {self.delta}")
        if self.pyramid_beta < 1:
            raise ValueError(f"pyramid_beta: must be >= 1, got {self.pyramid_beta}")
        if self.align < 1:
            raise ValueError(f"align: must be >= 1, got {self.align}")
        if self.drafter_mode is not None and self.drafter_mode not in DRAFTER_MODES:
            raise ValueError(f"drafter_mode: expected one of {', '.join(DRAFTER_MODES)}, got {self.drafter_mode!r}")
        if self.num_drafters is not None and self.num_drafters < 0:
            raise ValueError(f"num_drafters: must be >= 0, got {self.num_drafters}")
        if self.peak_limit is not None and not 0 < self.peak_limit <= 1:
            raise ValueError(f"peak_limit: must be a fraction in (0, 1] of full's peak, got {self.peak_limit}")


# ------------------------------------------------------------------------ schedule helpers
def scale_tokens(patch: int | Sequence[int]) -> int:
    """Tokens of one scale: ``side ** 2`` for a square scale, ``h * w`` for an ``(h, w)`` pair."""
    if isinstance(patch, int):
        return patch * patch
    h, w = patch
    return int(h) * int(w)


def cumulative_lengths(patch_nums: Sequence[int]) -> list[int]:
    """Tokens cached after each scale with the full cache: 1, 5, 14, ... for VAR-256."""
    out, acc = [], 0
    for p in patch_nums:
        acc += scale_tokens(p)
        out.append(acc)
    return out


def reference_length(patch_nums: Sequence[int]) -> int:
    """T: the tokens a full-cache layer holds while the final scale runs."""
    cum = cumulative_lengths(patch_nums)
    return cum[-2] if len(cum) > 1 else cum[0]


def uniform_tokens(patch_nums: Sequence[int], kv_budget: float) -> int:
    """U: the average tokens a layer retains under ``kv_budget`` (at least 1)."""
    return max(1, round(kv_budget * reference_length(patch_nums)))


def compressed_scales(patch_nums: Sequence[int], kv_budget: float) -> list[int]:
    """Scales after which the cache is compressed (all but the last, once the cache exceeds U)."""
    u = uniform_tokens(patch_nums, kv_budget)
    cum = cumulative_lengths(patch_nums)
    return [si for si in range(len(patch_nums) - 1) if cum[si] > u]


# ------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class LayerwisePlan(KVPlan):
    """A ``KVPlan`` whose peak accounts for the runner compressing **layer by layer**.

    ``KVPlan.peak_pages`` charges every layer max(history, kept) at once. The runner, however,
    rewrites a layer's pages right after that layer's attention, before the next layer runs:
    while layer ``l`` holds max(history, kept), layers before it already hold their (new) kept
    set and layers after it still hold their history. With scalekv the drafter role moves
    between layers from one scale to the next (one layer shrinks while another grows), so the
    exact bound is noticeably lower than the simultaneous one. Both CFG sequences of a request
    follow the same plan and are at the same layer at any moment, so twice this per-sequence
    peak bounds the request.
    """

    def step_pages(self, si: int, block_size: int) -> int:
        """Most pages one sequence holds at any moment while scale ``si`` runs."""
        history = [self.history(si, la) for la in range(self.num_layers)]
        return step_peak(history, self.kept[si], block_size)[0]

    def peak_pages(self, block_size: int) -> int:
        return max(self.step_pages(si, block_size) for si in range(self.num_scales))

    def peak_tokens(self) -> int:
        return self.peak_pages(1)


def step_peak(before: Sequence[int], after: Sequence[int], block_size: int) -> tuple[int, int]:
    """(most pages one sequence holds at once during a step, the moment): the runner rewrites
    layer ``l``'s pages right after its attention, so while layer ``l`` runs, layers before it
    hold their new kept set (``after``), layer ``l`` holds max(before, after) and the layers
    after it still hold their history (``before``). The moment is the layer running at the
    peak (-1: before the first layer, ``len(before)``: after the last)."""
    b = [-(-x // block_size) for x in before]
    a = [-(-x // block_size) for x in after]
    peak, moment = sum(b), -1
    held = peak
    for la in range(len(b)):
        at = held - b[la] + max(b[la], a[la])
        if at > peak:
            peak, moment = at, la
        held += a[la] - b[la]
    if held > peak:
        peak, moment = held, len(b)
    return peak, moment


def full_step_peak_tokens(patch_nums: Sequence[int], depth: int, block_size: int) -> int:
    """The ``full`` policy's KV peak of one sequence in tokens: at its worst step, its pages
    (every layer holds the whole cache) plus the step's scratch (one layer's current tokens)."""
    lengths = [scale_tokens(p) for p in patch_nums]
    cum = cumulative_lengths(patch_nums)
    rows = [0] + [c if si < len(lengths) - 1 else 0 for si, c in enumerate(cum)]
    return max(step_peak([rows[si]] * depth, [rows[si + 1]] * depth, block_size)[0] * block_size + n
               for si, n in enumerate(lengths))


def _fit_step_peak(name: str, si: int, before: list[int], after_of, scratch: int, limit: int, block_size: int,
                   floor: int, protected: set[int]) -> tuple[list[int], list[int]]:
    """Lower ``before`` (the previous scale's kept row) until step ``si``'s peak, pages held
    plus ``scratch`` tokens, fits in ``limit`` tokens; returns (before, after).

    A layer that grows early in the step (a drafter taking in the current map) peaks while
    the layers after it still hold their previous, larger shares: only those shares can make
    room, so the largest unprotected one (a refiner of the previous scale) gives up a page at
    a time, never below ``floor``, and the step's split is recomputed with the smaller
    history (``after_of(before)``). The drafters' histories (``protected``) are not touched.
    """
    before = list(before)
    while True:
        after = after_of(before)
        peak, moment = step_peak(before, after, block_size)
        if peak * block_size + scratch <= limit:
            return before, after
        cands = [la for la in range(moment + 1, len(before)) if la not in protected and before[la] > floor]
        if not cands:
            raise ValueError(f"peak_limit: plan {name!r} cannot keep scale {si}'s KV peak within {limit} tokens "
                             f"per sequence (it needs {peak * block_size + scratch} with every refiner of the "
                             "previous scale at its window): raise peak_limit or kv_budget")
        la = max(cands, key=lambda i: (before[i], i))
        before[la] = max(floor, (before[la] - 1) // block_size * block_size)


def _build(name: str, patch_nums: Sequence[int], depth: int, settings: BudgetSettings, split,
           drafters_of=None, peak_limit: float | None = None) -> KVPlan:
    """Shared skeleton: whole leading scales, ``split(si, j, avail) -> per-layer kept`` at the
    j-th compressed scale, nothing after the last scale.

    With ``peak_limit`` (a fraction of ``full``'s peak, scratch included) every step's peak is
    kept within it by lowering, where a step would exceed it, the previous compressed scale's
    refiner shares (``_fit_step_peak``): those scales then keep less than ``layers * U``."""
    lengths = [scale_tokens(p) for p in patch_nums]
    cum = cumulative_lengths(patch_nums)
    u = uniform_tokens(patch_nums, settings.kv_budget)
    bs = settings.align
    limit = None if peak_limit is None else int(peak_limit * full_step_peak_tokens(patch_nums, depth, bs))
    floor = min(settings.window_size, u)
    kept: list[tuple[int, ...]] = []
    drafters: list[tuple[int, ...]] = []
    j = 0
    for si, n in enumerate(lengths):
        hist = kept[-1] if kept else (0,) * depth
        last = si == len(lengths) - 1
        if not last and cum[si] <= u:
            kept.append((cum[si],) * depth)
            drafters.append(())
            continue

        def after_of(before: Sequence[int], si: int = si, n: int = n, last: bool = last, j: int = j) -> list[int]:
            if last:
                return [0] * depth
            avail = [h + n for h in before]
            row = split(si, j, avail, u)
            if sum(row) != depth * u or any(not 0 <= r <= a for r, a in zip(row, avail)):
                raise AssertionError(f"{name}: bad split at scale {si}: {row} (avail {avail}, target {depth * u})")
            return row

        if limit is not None and j > 0:  # the previous row is compressed: it may give up refiner shares
            protected = set(drafters_of(si - 1)) if drafters_of else set()
            before, row = _fit_step_peak(name, si, list(hist), after_of, n, limit, bs, floor, protected)
            kept[-1] = tuple(before)
        else:
            row = after_of(hist)
        kept.append(tuple(row))
        drafters.append(tuple(drafters_of(si)) if drafters_of and not last else ())
        if not last:
            j += 1
    return LayerwisePlan(name=name, kept=tuple(kept), drafters=tuple(drafters))


def uniform_plan(patch_nums: Sequence[int], depth: int, settings: BudgetSettings, name: str = "uniform") -> KVPlan:
    """Every layer keeps U tokens at every compressed scale (sliding, streaming, h2o, snapkv)."""

    def split(si: int, j: int, avail: list[int], u: int) -> list[int]:
        return water_fill(depth * u, avail)  # not page-aligned: equal budgets are the baseline's definition

    return _build(name, patch_nums, depth, settings, split)


def pyramid_plan(patch_nums: Sequence[int], depth: int, settings: BudgetSettings, name: str = "pyramidkv") -> KVPlan:
    """PyramidKV: budgets decrease linearly with depth, from ``2U - b_min`` (layer 0) down to
    ``b_min = max(U / beta, window)`` (last layer); mean U."""

    def split(si: int, j: int, avail: list[int], u: int) -> list[int]:
        floor = min(settings.window_size, u)
        b_min = min(float(u), max(u / settings.pyramid_beta, floor))
        b_max = 2 * u - b_min
        targets = [b_max - (b_max - b_min) * la / max(depth - 1, 1) for la in range(depth)]
        ints = [int(t) for t in targets]
        order = sorted(range(depth), key=lambda la: -(targets[la] - ints[la]))
        for la in order[: depth * u - sum(ints)]:
            ints[la] += 1
        row = [min(t, a) for t, a in zip(ints, avail)]
        return fill_up(row, depth * u, avail, settings.align)

    return _build(name, patch_nums, depth, settings, split)


def scalekv_plan(profile: ScaleProfile, settings: BudgetSettings, name: str = "scalekv") -> KVPlan:
    """ScaleKV: at each compressed scale ``N_d * B_d + N_r * B_r = layers * U``.

    The cache kept after scale ``si`` is read by scale ``si + 1``, so its split follows the
    profile's drafters of scale ``si + 1``. With ``delta`` None drafters keep everything they
    hold (history + current) as long as every refiner keeps at least ``window_size`` tokens;
    refiners share the rest equally. With ``delta`` the refiner budget decays linearly,
    ``B_r = max(window, U - delta * j)``, and drafters share what refiners leave (``delta`` 0
    is the uniform split).

    Shallow models hit the refiner floor: on var-tiny (8 layers, U = 42 at 10%) the whole
    budget is 336 tokens, so a drafter gets at most 336 - 7 x 16 = 224 tokens, not all 424 it
    could hold. A layer that becomes a drafter only holds what it kept as a refiner plus the
    current map, so "keeps all it holds" is as much as it can get; ``drafter_mode`` "sticky"
    or "fixed" (``memory.profile.normalize_drafters``) keeps the drafter set stable over the
    compressed scales so that drafters still hold their history when they need it.
    """
    depth, patch_nums = profile.depth, profile.patch_nums
    align = settings.align
    readers = [si + 1 for si in compressed_scales(patch_nums, settings.kv_budget)]
    profile = normalize_drafters(profile, settings.drafter_mode or "calibrated", readers, settings.num_drafters)

    def split(si: int, j: int, avail: list[int], u: int) -> list[int]:
        total = depth * u
        dr = set(profile.drafters[si + 1])
        d_idx = [la for la in range(depth) if la in dr]
        r_idx = [la for la in range(depth) if la not in dr]
        floor = min(settings.window_size, u)
        row = [0] * depth
        if settings.delta is None:
            ref_floor = sum(min(floor, avail[la]) for la in r_idx)
            d_alloc = water_fill(min(total - ref_floor, sum(avail[la] for la in d_idx)),
                                 [avail[la] for la in d_idx], align)
            for la, b in zip(d_idx, d_alloc):
                row[la] = b
            r_alloc = water_fill(min(total - sum(d_alloc), sum(avail[la] for la in r_idx)),
                                 [avail[la] for la in r_idx], align, floors=[floor] * len(r_idx))
            for la, b in zip(r_idx, r_alloc):
                row[la] = b
        else:
            b_r = max(floor, round(u - settings.delta * j)) if d_idx else u
            for la in r_idx:
                row[la] = min(b_r, avail[la])
            d_alloc = water_fill(min(total - sum(row), sum(avail[la] for la in d_idx)),
                                 [avail[la] for la in d_idx], align)
            for la, b in zip(d_idx, d_alloc):
                row[la] = b
        return fill_up(row, total, avail, align)

    return _build(name, patch_nums, depth, settings, split, drafters_of=lambda si: profile.drafters[si + 1],
                  peak_limit=settings.peak_limit)


def capacity_plan(profile: ScaleProfile, name: str = "scalekv") -> KVPlan:
    """The plan of a profile that carries per-(scale, layer) capacities (``profile.capacities``),
    with the released ScaleKV rule: after scale ``si`` a layer holds ``history + current``; it
    stays whole while that is at most ``profile.base_capacity`` and it has never been
    compressed, else it keeps ``min(holds, capacities[si + 1][layer])`` (the reader's row, the
    same indexing as ``drafters``). Nothing is kept after the last scale.
    """
    if not profile.capacities:
        raise ValueError(f"profile for {profile.model!r} has no per-scale capacities")
    depth, base = profile.depth, profile.base_capacity
    lengths = [scale_tokens(p) for p in profile.patch_nums]
    kept: list[tuple[int, ...]] = []
    drafters: list[tuple[int, ...]] = []
    started = [False] * depth
    hist = [0] * depth
    for si, n in enumerate(lengths):
        if si == len(lengths) - 1:
            kept.append((0,) * depth)
            drafters.append(())
            break
        caps = profile.capacities[si + 1]
        row = []
        for la in range(depth):
            holds = hist[la] + n
            if not started[la] and holds <= base:
                row.append(holds)
                continue
            if not caps:
                raise ValueError(f"profile for {profile.model!r}: layer {la} holds {holds} tokens after scale {si} "
                                 f"(more than base_capacity {base}) but the profile has no capacities for scale "
                                 f"{si + 1}")
            started[la] = True
            row.append(min(holds, caps[la]))
        kept.append(tuple(row))
        drafters.append(tuple(profile.drafters[si + 1]) if caps else ())
        hist = row
    return LayerwisePlan(name=name, kept=tuple(kept), drafters=tuple(drafters))


def budget_plan(policy: str, patch_nums: Sequence[int], depth: int, settings: BudgetSettings,
                profile: ScaleProfile | None = None) -> KVPlan:
    """The plan a named policy runs under (``full`` ignores the budget).

    A scalekv profile with per-scale capacities (an imported budget file) is replayed as is
    (``capacity_plan``) when the requested budget is the file's: ``kv_budget`` equals the
    profile's nominal ``budget`` or retains exactly its ``base_capacity`` tokens per layer;
    any other budget splits with the profile's drafters (``scalekv_plan``).
    """
    from dataclasses import replace

    from .policy_names import PLAN_KINDS, POLICY_DEFAULTS

    kind = PLAN_KINDS.get(policy)
    if kind is None:
        raise ValueError(f"policy: unknown policy {policy!r} (available: {', '.join(sorted(PLAN_KINDS))})")
    if kind == "full" or settings.kv_budget >= 1.0:
        return uniform_plan(patch_nums, depth, BudgetSettings(kv_budget=1.0), name=policy)
    if kind == "uniform":
        return uniform_plan(patch_nums, depth, settings, name=policy)
    if kind == "pyramid":
        return pyramid_plan(patch_nums, depth, settings, name=policy)
    if profile is None:
        raise ValueError(f"policy {policy!r} needs a scale profile")
    if profile.capacities and profile.budget_matches(settings.kv_budget):
        return capacity_plan(profile, name=policy)
    if settings.drafter_mode is None:
        mode = POLICY_DEFAULTS.get(policy, {}).get("drafter_mode", "calibrated")
        settings = replace(settings, drafter_mode=mode)
    return scalekv_plan(profile, settings, name=policy)


def check_plan(plan: KVPlan, patch_nums: Sequence[int]) -> None:
    """Raise ValueError if a plan keeps tokens a layer cannot hold (more than its history plus
    the current scale) or keeps anything after the last scale."""
    lengths = [scale_tokens(p) for p in patch_nums]
    if plan.num_scales != len(lengths):
        raise ValueError(f"plan {plan.name!r}: {plan.num_scales} scales, the model has {len(lengths)}")
    for si, row in enumerate(plan.kept):
        for la, k in enumerate(row):
            if not 0 <= k <= plan.history(si, la) + lengths[si]:
                raise ValueError(f"plan {plan.name!r}: scale {si} layer {la} keeps {k} tokens, it holds "
                                 f"{plan.history(si, la) + lengths[si]}")
    if any(plan.kept[-1]):
        raise ValueError(f"plan {plan.name!r}: keeps tokens after the last scale")
