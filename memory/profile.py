"""The per-model **scale profile**: which layers are drafters at each scale, and why.

ScaleKV gives each (scale, layer) the cache its role needs: *drafters* spread attention over
earlier scales and keep (nearly) their whole history, *refiners* look at the current map and
share what is left of the budget. Which layers are which is a property of the trained weights,
measured once by calibration (``engine.calibrate``) and stored as JSON beside the checkpoint
(``engine/models/weights/<model>/scale_profile.json``).

Indexing: ``drafters[k]`` are the layers that are drafters **when scale k reads its history**.
The budget of the cache a layer keeps after scale ``k - 1`` therefore follows ``drafters[k]``
(the reader's role), as in the released ScaleKV budget files. Scale 0 has no history, so
``drafters[0]`` is always empty.

A profile may also carry exact per-scale budgets, ``capacities[k][layer]``: the most tokens a
layer keeps after scale ``k - 1`` (same reader indexing as ``drafters``; an empty row = that
history is never compressed), plus ``base_capacity``, the released code's ``max_capacity``: a
layer's cache stays whole while it holds at most that many tokens and has never been
compressed. Budget files of the ScaleKV release are imported this way
(``memory.profile_import``); ``memory.budgets.capacity_plan`` replays them. Profiles without
capacities are written exactly as before (version 1); with them, version 2.

Calibration may move the drafter role between layers from scale to scale, but a layer keeps
history only while it is a drafter: ``normalize_drafters`` makes the set "sticky" (every layer
that is ever a drafter at a compressed scale is one at all of them) or "fixed" (the few layers
most often chosen, at every compressed scale, as in the paper's released budget tables).

A profile is only meaningful for the model it was measured on: loading validates the model
name, the scale schedule and the depth, and refuses a mismatch with an error naming the field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PROFILE_VERSION = 1
CAPACITY_PROFILE_VERSION = 2  # written when the profile carries per-scale capacities
_VERSIONS = (PROFILE_VERSION, CAPACITY_PROFILE_VERSION)
_CAPACITY_FIELDS = ("capacities", "base_capacity", "budget", "budget_source")
PROFILE_FILE = "scale_profile.json"


class ProfileMismatchError(ValueError):
    """A scale profile was measured on a different model, scale schedule or depth."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How a profile was measured; stored so that a profile can be reproduced exactly."""

    num_requests: int = 10
    seed: int = 0  # request seeds seed..seed+n-1 and the query-sampling generator
    num_queries: int = 64  # current-scale queries sampled per (scale, layer) and request
    topk_ratio: float = 0.1  # K' = max(1, round(topk_ratio * history length))
    num_drafters: int = 0  # N_d: (layer, scale) pairs marked as drafters, over all scales
    cfg: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    dtype: str = "float32"
    weights: str = ""  # where the model's weights came from (informational)


@dataclass(frozen=True)
class ScaleProfile:
    """Drafter layers per scale plus the measurements they were derived from.

    ``asi[k][layer]`` is the Attention Selectivity Index, ``zscore[k][layer]`` its z-score within
    scale k, ``current_mass`` / ``history_topk`` its two factors. Low ASI = attention spread over
    the history = drafter.
    """

    model: str
    patch_nums: tuple[int, ...]
    depth: int
    drafters: tuple[tuple[int, ...], ...]
    asi: tuple[tuple[float, ...], ...] = ()
    zscore: tuple[tuple[float, ...], ...] = ()
    current_mass: tuple[tuple[float, ...], ...] = ()
    history_topk: tuple[tuple[float, ...], ...] = ()
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)
    version: int = PROFILE_VERSION
    # exact budgets (imported budget files); empty = computed from the drafters and kv_budget
    capacities: tuple[tuple[int, ...], ...] = ()
    base_capacity: int | None = None  # the released max_capacity: whole caches up to this
    budget: float | None = None  # nominal budget of the capacities (0.1 = "10%")
    budget_source: str = ""  # where the capacities came from (informational)

    def __post_init__(self) -> None:
        k = len(self.patch_nums)
        if len(self.drafters) != k:
            raise ValueError(f"drafters: expected one entry per scale ({k}), got {len(self.drafters)}")
        if self.drafters and self.drafters[0]:
            raise ValueError("drafters: scale 0 has no history and cannot have drafters")
        for si, layers in enumerate(self.drafters):
            bad = [la for la in layers if not 0 <= la < self.depth]
            if bad:
                raise ValueError(f"drafters[{si}]: layers {bad} outside 0..{self.depth - 1}")
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"drafters[{si}]: layers must be unique and sorted, got {list(layers)}")
        for name in ("asi", "zscore", "current_mass", "history_topk"):
            table = getattr(self, name)
            if table and (len(table) != k or any(len(row) != self.depth for row in table)):
                raise ValueError(f"{name}: expected a [{k} scales x {self.depth} layers] table")
        if self.capacities:
            if len(self.capacities) != k:
                raise ValueError(f"capacities: expected one row per scale ({k}), got {len(self.capacities)}")
            if self.capacities[0]:
                raise ValueError("capacities: scale 0 has no history and cannot have capacities")
            for si, row in enumerate(self.capacities):
                if row and (len(row) != self.depth or any(c < 0 for c in row)):
                    raise ValueError(f"capacities[{si}]: expected {self.depth} token counts >= 0, got {list(row)}")
            if self.base_capacity is None or self.base_capacity < 1:
                raise ValueError(f"base_capacity: profiles with capacities need one >= 1, got {self.base_capacity}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget: must be a fraction in (0, 1], got {self.budget}")

    # ----- queries ---------------------------------------------------------------------
    def is_drafter(self, scale: int, layer: int) -> bool:
        return layer in self.drafters[scale]

    @property
    def num_drafter_pairs(self) -> int:
        return sum(len(d) for d in self.drafters)

    def budget_matches(self, kv_budget: float) -> bool:
        """Whether ``kv_budget`` is the budget of this profile's capacities: its nominal
        ``budget``, or a fraction that retains exactly ``base_capacity`` tokens per layer
        (``round(kv_budget * T)``, T = tokens cached before the last scale)."""
        if not self.capacities:
            return False
        if self.budget is not None and abs(kv_budget - self.budget) < 1e-9:
            return True
        sizes = [p * p if isinstance(p, int) else p[0] * p[1] for p in self.patch_nums]
        reference = sum(sizes[:-1]) if len(sizes) > 1 else sizes[0]
        return max(1, round(kv_budget * reference)) == self.base_capacity

    # ----- validation ------------------------------------------------------------------
    def check_matches(self, model: str | None = None, patch_nums: tuple[int, ...] | list[int] | None = None,
                      depth: int | None = None, source: str = "scale profile") -> None:
        """Raise ``ProfileMismatchError`` naming the first field that differs from the model
        (fields passed as None are not checked)."""
        if model is not None and self.model != model:
            raise ProfileMismatchError(
                f"{source}: model is {self.model!r} but the engine runs {model!r}; "
                f"calibrate one with `scalekv calibrate --model {model} --out PROFILE.json`"
            )
        if patch_nums is not None and tuple(self.patch_nums) != tuple(patch_nums):
            raise ProfileMismatchError(
                f"{source}: patch_nums (scale schedule) {list(self.patch_nums)} differ from the model's "
                f"{list(patch_nums)}"
            )
        if depth is not None and self.depth != depth:
            raise ProfileMismatchError(f"{source}: depth is {self.depth} but the model has {depth} layers")

    # ----- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = [p if isinstance(p, int) else list(p) for p in self.patch_nums]
        d["drafters"] = {str(si): list(layers) for si, layers in enumerate(self.drafters)}
        for name in ("asi", "zscore", "current_mass", "history_topk"):
            d[name] = [[round(float(x), 8) for x in row] for row in getattr(self, name)]
        if self.capacities:
            d["version"] = CAPACITY_PROFILE_VERSION
            d["capacities"] = {str(si): list(row) for si, row in enumerate(self.capacities) if row}
        else:  # a plain profile is written exactly as before
            for name in _CAPACITY_FIELDS:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "scale profile") -> ScaleProfile:
        try:
            version = int(d.get("version", 0))
            if version not in _VERSIONS:
                raise ValueError(f"version: expected one of {list(_VERSIONS)}, got {version}")
            patch_nums = _schedule(d["patch_nums"])
            raw = d["drafters"]
            if isinstance(raw, dict):
                drafters = tuple(tuple(int(x) for x in raw.get(str(si), [])) for si in range(len(patch_nums)))
            else:
                drafters = tuple(tuple(int(x) for x in row) for row in raw)
            tables = {name: tuple(tuple(float(x) for x in row) for row in d.get(name, []))
                      for name in ("asi", "zscore", "current_mass", "history_topk")}
            caps = d.get("capacities") or {}
            if isinstance(caps, dict):
                capacities = tuple(tuple(int(x) for x in caps.get(str(si), [])) for si in range(len(patch_nums)))
            else:
                capacities = tuple(tuple(int(x) for x in row) for row in caps)
            if not any(capacities):
                capacities = ()
            base = d.get("base_capacity")
            budget = d.get("budget")
            return cls(
                model=str(d["model"]),
                patch_nums=patch_nums,
                depth=int(d["depth"]),
                drafters=drafters,
                settings=CalibrationSettings(**d.get("settings", {})),
                version=version,
                capacities=capacities,
                base_capacity=None if base is None else int(base),
                budget=None if budget is None else float(budget),
                budget_source=str(d.get("budget_source", "")),
                **tables,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_format(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, patch_nums: tuple[int, ...] | None = None,
             depth: int | None = None) -> ScaleProfile:
        """Read a profile; when the model's name / schedule / depth are given, check them."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"scale profile not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"scale profile {path}: not valid JSON ({e})") from None
        prof = cls.from_dict(data, source=f"scale profile {path}")
        prof.check_matches(model, patch_nums, depth, source=f"scale profile {path}")
        return prof


DRAFTER_MODES = ("calibrated", "sticky", "fixed")


def _schedule(raw) -> tuple:
    """A stored scale schedule: sides (VAR, square maps) or ``[h, w]`` pairs (Infinity)."""
    out = []
    for p in raw:
        if isinstance(p, (list, tuple)):
            if len(p) != 2:
                raise ValueError(f"patch_nums: expected a side or an [h, w] pair, got {p!r}")
            out.append((int(p[0]), int(p[1])))
        else:
            out.append(int(p))
    return tuple(out)


def normalize_drafters(profile: ScaleProfile, mode: str, scales: Sequence[int],
                       num_fixed: int | None = None) -> ScaleProfile:
    """The profile with its drafters at the reading scales ``scales`` made stable across scales.

    A layer keeps history only while it is a drafter: one that is a refiner at one compressed
    scale and a drafter at the next has already evicted the history its new role needs (it
    holds its refiner share plus the current map). Modes:

    - ``calibrated``: the profile as measured (drafters may move between layers).
    - ``sticky``: a layer that is a drafter at any of ``scales`` is a drafter at all of them,
      so it keeps its history from the first compressed scale on.
    - ``fixed``: the paper's observation that a few layers are drafters at (almost) every
      scale: the ``num_fixed`` layers that are drafters at the most of ``scales`` (ties: lower
      summed z-score, i.e. more spread attention, then lower index) are the drafters at all of
      them. ``num_fixed`` defaults to the mean drafter count per scale, rounded (at least 1
      when the profile has any drafter there).

    Scales outside ``scales`` keep their drafters; ``scales`` are reading scales (scale
    ``si + 1`` reads what compression after scale ``si`` kept), and scale 0 is never one.
    """
    if mode not in DRAFTER_MODES:
        raise ValueError(f"drafter_mode: expected one of {', '.join(DRAFTER_MODES)}, got {mode!r}")
    scales = sorted(set(scales))
    if any(not 0 < k < len(profile.patch_nums) for k in scales):
        raise ValueError(f"scales: reading scales must be in 1..{len(profile.patch_nums) - 1}, got {scales}")
    if mode == "calibrated" or not scales:
        return profile
    counts = Counter(la for k in scales for la in profile.drafters[k])
    if mode == "sticky":
        chosen = tuple(sorted(counts))
    else:
        if num_fixed is None:
            num_fixed = round(sum(counts.values()) / len(scales))
            num_fixed = max(num_fixed, 1) if counts else 0
        if not 0 <= num_fixed <= profile.depth:
            raise ValueError(f"num_fixed: must be in 0..{profile.depth}, got {num_fixed}")

        def z(la: int) -> float:
            return sum(profile.zscore[k][la] for k in scales) if profile.zscore else 0.0

        ranked = sorted(range(profile.depth), key=lambda la: (-counts.get(la, 0), z(la), la))
        chosen = tuple(sorted(ranked[:num_fixed]))
    drafters = tuple(chosen if k in scales else row for k, row in enumerate(profile.drafters))
    return replace(profile, drafters=drafters)


def _format(d: dict) -> str:
    """JSON with one line per field and per table row (readable diffs of shipped profiles)."""
    parts = []
    for key, value in d.items():
        if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
            rows = ",\n".join(f"  {json.dumps(r)}" for r in value)
            parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"
