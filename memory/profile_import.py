"""Import a budget file of the ScaleKV release into a ``ScaleProfile`` with exact capacities.

The released format (one file per model and budget, 1024 x 1024 at 1:1 only) is a JSON object
with keys ``"Scale 9"`` ... ``"Scale 13"`` (the first key depends on the budget). Each value
holds a 0/1 flag per block, ``"Block 0"`` ... (1 = drafter), and

- ``High``: the number of drafters (checked against the flags);
- ``Max``: the token capacity of every drafter, ``Min``: that of every refiner;
- ``Limit``: informational, the drafter cache length just before that compression (the
  previous ``Max`` plus the new scale); checked and reported, never enforced.

Index mapping: the released code compresses a layer right after it has run scale index
``si`` (0-based) to the capacities of ``"Scale {si + 2}"``, so ``"Scale s"`` is the cache read
by scale ``s - 1``: ``drafters[s - 1]`` and ``capacities[s - 1]`` in this project's reader
indexing (``memory.profile``). The final scale's cache is never read again; nothing is kept
after it (the released code compresses it with ``"Scale 13"`` once more and then drops it).

Start rule: the released code's ``max_capacity`` (``base_capacity`` here) leaves a layer's
cache whole while it holds at most that many tokens and has never been compressed. The first
key of the file must therefore be the compression after the first scale whose cumulative
cache exceeds it (650 tokens: ``"Scale 9"``, after the 20 x 20 map; 265: ``"Scale 8"``; 1300:
``"Scale 10"``). When it is not given, it is inferred from the file: every scale's total
``N_d * Max + N_r * Min`` must be the same multiple of the depth (``depth * max_capacity``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .profile import CAPACITY_PROFILE_VERSION, CalibrationSettings, ScaleProfile

__all__ = ["BudgetImport", "import_released_budgets", "load_released_budgets"]

_SCALE_KEY = re.compile(r"^Scale\s*(\d+)$")
_BLOCK_KEY = re.compile(r"^Block\s*(\d+)$")
_FIELDS = ("High", "Max", "Min", "Limit")


@dataclass
class BudgetImport:
    """What the import found: mapping, inferred settings and consistency checks."""

    json_scales: list[int]  # "Scale s" keys, ascending
    reader_scales: list[int]  # s - 1 for each: the scale that reads that cache
    base_capacity: int
    budget: float
    first_compressed_scale: int  # 0-based scale index after which compression starts
    totals: dict[int, int]  # reader scale -> N_d * Max + N_r * Min
    limits: dict[int, int | None]  # reader scale -> Limit as written
    limit_mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if f != int(f) or f < 0:
        raise ValueError(f"{where}: expected an integer >= 0, got {value!r}")
    return int(f)


def _cumulative(patch_nums: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for p in patch_nums:
        acc += p * p
        out.append(acc)
    return out


def import_released_budgets(data: dict, model: str, patch_nums: Sequence[int], depth: int,
                            base_capacity: int | None = None, budget: float | None = None,
                            source: str = "") -> tuple[ScaleProfile, BudgetImport]:
    """A ``ScaleProfile`` (drafters + exact capacities) from a released budget JSON object.

    ``patch_nums`` / ``depth``: the model's square scale schedule and number of blocks (the
    released files are for Infinity at 1024 x 1024, 1:1). ``base_capacity``: the released
    ``max_capacity`` (None: inferred from the totals). ``budget``: the nominal budget fraction
    (None: ``base_capacity / T`` to the nearest percent, T = tokens before the last scale).
    Raises ValueError naming the key of anything inconsistent.
    """
    if not isinstance(data, dict):
        raise ValueError(f"budget file: expected a JSON object of \"Scale N\" entries, got {type(data).__name__}")
    patch_nums = tuple(int(p) for p in patch_nums)
    num_scales = len(patch_nums)
    cum = _cumulative(patch_nums)
    entries: dict[int, dict] = {}
    for key, value in data.items():
        m = _SCALE_KEY.match(str(key).strip())
        if not m:
            raise ValueError(f"budget file: unknown key {key!r} (expected \"Scale N\")")
        s = int(m.group(1))
        if not 2 <= s <= num_scales:
            raise ValueError(f"budget file: {key!r} is outside \"Scale 2\"..\"Scale {num_scales}\" for a model with "
                             f"{num_scales} scales (\"Scale s\" is the cache kept after scale index s - 2)")
        if s in entries:
            raise ValueError(f"budget file: {key!r} appears twice")
        if not isinstance(value, dict):
            raise ValueError(f"budget file: {key!r} must be an object of block flags and High/Max/Min/Limit")
        entries[s] = value
    if not entries:
        raise ValueError("budget file: no \"Scale N\" entries")
    scales = sorted(entries)
    if scales != list(range(scales[0], num_scales + 1)):
        raise ValueError(f"budget file: scales {scales} must run without gaps up to \"Scale {num_scales}\" "
                         f"(the last cache that is read)")

    drafters: list[tuple[int, ...]] = [()] * num_scales
    capacities: list[tuple[int, ...]] = [()] * num_scales
    totals: dict[int, int] = {}
    limits: dict[int, int | None] = {}
    for s in scales:
        entry, name = entries[s], f"\"Scale {s}\""
        flags: dict[int, int] = {}
        for key, value in entry.items():
            if key in _FIELDS:
                continue
            m = _BLOCK_KEY.match(str(key).strip())
            if not m:
                raise ValueError(f"budget file: {name}: unknown key {key!r}")
            flag = _int(value, f"{name} {key!r}")
            if flag not in (0, 1):
                raise ValueError(f"budget file: {name} {key!r}: a block flag is 0 or 1, got {value!r}")
            flags[int(m.group(1))] = flag
        if sorted(flags) != list(range(depth)):
            missing = sorted(set(range(depth)) - set(flags))
            extra = sorted(set(flags) - set(range(depth)))
            raise ValueError(f"budget file: {name}: expected flags for blocks 0..{depth - 1}"
                             + (f", missing {missing}" if missing else "") + (f", unknown {extra}" if extra else ""))
        for key in ("High", "Max", "Min"):
            if key not in entry:
                raise ValueError(f"budget file: {name}: missing {key!r}")
        high, cap_max, cap_min = (_int(entry[k], f"{name} {k!r}") for k in ("High", "Max", "Min"))
        dr = tuple(b for b in range(depth) if flags[b])
        if high != len(dr):
            raise ValueError(f"budget file: {name}: High is {high} but {len(dr)} blocks are flagged as drafters")
        k = s - 1
        drafters[k] = dr
        capacities[k] = tuple(cap_max if flags[b] else cap_min for b in range(depth))
        totals[k] = sum(capacities[k])
        limits[k] = _int(entry["Limit"], f"{name} 'Limit'") if "Limit" in entry else None

    warnings: list[str] = []
    if base_capacity is None:
        values = set(totals.values())
        if len(values) != 1 or next(iter(values)) % depth:
            raise ValueError(f"budget file: cannot infer max_capacity: the per-scale totals {totals} are not one "
                             f"multiple of the depth {depth}; pass it explicitly")
        base_capacity = next(iter(values)) // depth
    elif any(t != depth * base_capacity for t in totals.values()):
        warnings.append(f"totals {totals} differ from depth x max_capacity = {depth * base_capacity}")
    if base_capacity < 1:
        raise ValueError(f"max_capacity: must be >= 1, got {base_capacity}")

    first = scales[0] - 2  # scale index after which the file's first compression runs
    start = next((si for si in range(num_scales - 1) if cum[si] > base_capacity), None)
    if start is None:
        raise ValueError(f"max_capacity {base_capacity}: no cache ever exceeds it, nothing would be compressed")
    if start < first:
        raise ValueError(f"budget file starts at \"Scale {scales[0]}\" but with max_capacity {base_capacity} the "
                         f"cache ({cum[start]} tokens) is compressed from scale index {start} on, which needs "
                         f"\"Scale {start + 2}\"")
    if start > first:
        warnings.append(f"\"Scale {scales[0]}\"..\"Scale {start + 1}\" are never used: caches stay whole up to "
                        f"max_capacity {base_capacity} until scale index {start}")

    reference = cum[-2] if num_scales > 1 else cum[0]
    if budget is None:
        budget = round(base_capacity / reference, 2) or base_capacity / reference
    profile = ScaleProfile(model=model, patch_nums=patch_nums, depth=depth, drafters=tuple(drafters),
                           version=CAPACITY_PROFILE_VERSION, capacities=tuple(capacities),
                           base_capacity=base_capacity, budget=budget, budget_source=source,
                           settings=CalibrationSettings(num_requests=0, num_queries=0, topk_ratio=0.0,
                                                        weights=f"imported budgets: {source}" if source else ""))

    from .budgets import capacity_plan  # the replay the engine runs; checks the capacities are usable

    plan = capacity_plan(profile)
    mismatches = []
    for k, limit in limits.items():
        if limit is None or not drafters[k]:
            continue
        holds = max(plan.history(k - 1, b) + patch_nums[k - 1] ** 2 for b in drafters[k])
        if holds != limit:
            mismatches.append(f"\"Scale {k + 1}\": Limit {limit}, a drafter holds {holds} tokens before compression")
    report = BudgetImport(json_scales=scales, reader_scales=[s - 1 for s in scales], base_capacity=base_capacity,
                          budget=budget, first_compressed_scale=start, totals=totals, limits=limits,
                          limit_mismatches=mismatches, warnings=warnings)
    return profile, report


def load_released_budgets(path: str | Path, model: str, patch_nums: Sequence[int], depth: int,
                          base_capacity: int | None = None,
                          budget: float | None = None) -> tuple[ScaleProfile, BudgetImport]:
    """``import_released_budgets`` on a file (its name is recorded as the profile's source)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"budget file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"budget file {path}: not valid JSON ({e})") from None
    return import_released_budgets(data, model, patch_nums, depth, base_capacity, budget, source=path.name)
