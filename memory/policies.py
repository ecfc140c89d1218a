"""KV selection policies: which of a layer's (history + current) tokens survive a scale.

All policies share one interface, called by the runner right after a layer's attention at a
scale whose plan keeps fewer tokens than the layer holds (``SelectionPolicy.select``). It gets
the layer's real queries of the current scale (L2-normalised, scaled, with biases: exactly what
attention used) and all candidate keys, history first, and returns for every sequence and head
the sorted indices of the ``capacity`` tokens to keep. Heads keep equal counts so that one page
slot holds one token of every head (each head may keep a different token there: VAR has no
RoPE, positions are baked into the inputs, so a key does not need to know where it came from).

Policies (and the budget split they run under, see ``memory.budgets``):

- ``full``: keeps everything (the full plan).
- ``sliding``: the most recent ``capacity`` tokens (Longformer-style window).
- ``streaming``: attention sinks (the first tokens) + the most recent (StreamingLLM).
- ``h2o``: heavy hitters by attention accumulated over all queries of all scales so far, plus
  the most recent tokens (H2O); keeps per-(sequence, layer) scores as state.
- ``snapkv``: uniform budget; the last ``window`` current tokens are the observation window.
- ``pyramidkv``: SnapKV selection under budgets that decrease with depth.
- ``scalekv``: the scale profile's drafter/refiner budgets; the window is the centre token of
  each cell of a sqrt(W) x sqrt(W) grid stretched over the current h x w map (spatial coverage). The paper's
  method, as shipped.
- ``scalekv-allq``: ScaleKV's budgets (calibrated drafters) with every candidate scored by the
  attention of **all** current-scale queries, not pooled (see ``POLICY_DEFAULTS``); on var-tiny
  at 10% it is ~1.2 dB closer to the full cache than ``scalekv``.

Window scoring (snapkv, pyramidkv, scalekv): every candidate's score is the post-softmax
attention the window queries give it, summed over the window, smoothed by 1-D pooling along the
token order; the window tokens are always kept, the rest are the top scores.

Knobs of the window policies (``WindowPolicy``):

- ``score_queries``: ``"window"`` (the observation window, forced into the kept set) or
  ``"all"``: the softmax attention mass each candidate gets from every query of the current
  scale, computed in blocks of ``QUERY_BLOCK`` queries (memory ``[S, H, QUERY_BLOCK, N]``);
  there is no observation window then, nothing is forced.
- ``score``: ``"softmax"`` (the paper) or ``"logits"``: raw ``q.k`` summed over the scoring
  queries, no softmax (what the released ScaleKV code does). The released code also scores with
  re-projected queries without bias or normalisation; here the queries are always the ones
  attention used.
- ``pool_kernel`` / ``pooling``: 1-D max (the released code) or avg (the paper) smoothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .policy_names import PLAN_KINDS, POLICIES, POLICY_DEFAULTS, SCORE_QUERIES, SCORES, needs_profile

__all__ = [
    "PLAN_KINDS",
    "POLICIES",
    "SelectionContext",
    "SelectionPolicy",
    "grid_window",
    "last_window",
    "POLICY_DEFAULTS",
    "all_query_scores",
    "make_policy",
    "needs_profile",
    "pool_scores",
    "topk_keep",
    "window_scores",
]

QUERY_BLOCK = 256  # queries scored at once by all-query scoring (bounds the [S, H, Q, N] block)


@dataclass(frozen=True)
class SelectionContext:
    """What a policy knows about one selection call (all sequences share it).

    The current map is ``height x width`` tokens (Infinity's maps are h x w); a square VAR map
    may be given by ``side`` alone (``height = width = side``). ``side`` is the map's side when
    it is square, else None."""

    layer: int
    scale: int
    side: int | None = None  # square maps: the current map is side x side tokens
    hist_len: int = 0  # history tokens per sequence (candidates 0..hist_len-1)
    capacity: int = 0  # tokens to keep per sequence and head
    softmax_scale: float = 1.0
    seqs: tuple[int, ...] = ()
    height: int | None = None  # the current map is height x width tokens (row-major)
    width: int | None = None

    def __post_init__(self) -> None:
        h = self.side if self.height is None else self.height
        w = self.side if self.width is None else self.width
        if h is None or w is None:
            raise ValueError("SelectionContext: give side (square map) or height and width")
        if self.side is not None and (h, w) != (self.side, self.side):
            raise ValueError(f"SelectionContext: side {self.side} disagrees with the map {h} x {w}")
        object.__setattr__(self, "height", int(h))
        object.__setattr__(self, "width", int(w))
        object.__setattr__(self, "side", int(h) if h == w else None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def num_candidates(self) -> int:
        return self.hist_len + self.height * self.width


# ----------------------------------------------------------------------------- windows
def _cell_centres(n: int, g: int) -> list[int]:
    """Centres of ``g`` equal cells over ``n`` positions (every position when ``n <= g``)."""
    if n <= g:
        return list(range(n))
    bounds = [i * n // g for i in range(g + 1)]
    return [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(g)]


def grid_window(height: int, window_size: int, width: int | None = None) -> torch.Tensor:
    """Row-major positions in a ``height x width`` map (square ``height x height`` when
    ``width`` is None) of the centre token of each cell of a ``g x g`` grid
    (``g = sqrt(window_size)``) stretched over the map; along a dimension not larger than
    ``g`` every position is its own cell (so a map not larger than the grid gives all of it)."""
    g = math.isqrt(window_size)
    if g * g != window_size:
        raise ValueError(f"window_size: must be a perfect square for the grid window, got {window_size}")
    width = height if width is None else width
    rows, cols = _cell_centres(height, g), _cell_centres(width, g)
    return torch.tensor([r * width + c for r in rows for c in cols], dtype=torch.long)


def last_window(height: int, window_size: int, width: int | None = None) -> torch.Tensor:
    """The last ``window_size`` positions of the ``height x width`` map (square when ``width``
    is None) in raster order (SnapKV's window)."""
    n = height * (height if width is None else width)
    return torch.arange(max(0, n - window_size), n)


# ----------------------------------------------------------------------------- scoring
def window_scores(q_win: torch.Tensor, keys: torch.Tensor, softmax_scale: float,
                  score: str = "softmax") -> torch.Tensor:
    """Post-softmax attention of the window queries ``[S, H, W, D]`` over ``keys`` ``[S, H, N, D]``,
    summed over the window: ``[S, H, N]`` in float32 (``score="logits"``: the raw scaled
    ``q.k`` summed, no softmax)."""
    logits = torch.matmul(q_win.float(), keys.float().transpose(-1, -2)) * softmax_scale
    if score == "logits":
        return logits.sum(dim=2)
    if score != "softmax":
        raise ValueError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    return logits.softmax(dim=-1).sum(dim=2)


def all_query_scores(q: torch.Tensor, keys: torch.Tensor, softmax_scale: float, score: str = "softmax",
                     block: int = QUERY_BLOCK) -> torch.Tensor:
    """``window_scores`` over every query of ``q`` ``[S, H, Q, D]``, ``block`` queries at a time
    (so at most ``[S, H, block, N]`` logits exist at once): ``[S, H, N]`` float32."""
    s, h, nq, _ = q.shape
    out = torch.zeros(s, h, keys.shape[2], dtype=torch.float32, device=keys.device)
    for c in range(0, nq, block):
        out += window_scores(q[:, :, c : c + block], keys, softmax_scale, score)
    return out


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling (stride 1, same length) along the token order of ``[S, H, N]`` scores: keeps
    neighbours of strongly attended tokens, which preserves local structure."""
    if kernel <= 1:
        return scores
    s, h, n = scores.shape
    x = scores.reshape(s * h, 1, n)
    if pooling == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    else:
        raise ValueError(f"pooling: expected 'max' or 'avg', got {pooling!r}")
    return x[..., :n].reshape(s, h, n)


def topk_keep(scores: torch.Tensor, forced: torch.Tensor, capacity: int) -> torch.Tensor:
    """Indices ``[S, H, capacity]`` (sorted) of the ``forced`` positions plus the top scores.

    When there are at least ``capacity`` forced positions, the first ``capacity`` of them."""
    s, h, n = scores.shape
    if not 0 < capacity <= n:
        raise ValueError(f"capacity {capacity} outside 1..{n}")
    forced = forced.to(device=scores.device, dtype=torch.long)
    if forced.numel() >= capacity:
        return forced[:capacity].sort().values.expand(s, h, -1).contiguous()
    ranked = torch.nan_to_num(scores.float(), nan=0.0, posinf=3.0e38, neginf=-3.0e38)
    if forced.numel():
        ranked[..., forced] = float("inf")
    idx = ranked.topk(capacity, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


# ----------------------------------------------------------------------------- policies
class SelectionPolicy(ABC):
    """Base class. ``observes_every_step``: the runner calls ``select`` at every scale (even
    when nothing is evicted), for policies that accumulate state; ``select`` may then return
    None to mean "keep everything" (only allowed when capacity == number of candidates)."""

    name = "base"
    observes_every_step = False

    @abstractmethod
    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        """Kept candidate indices ``[S, H, capacity]`` (sorted), or None for "keep everything"."""

    def release(self, seq: int) -> None:
        """Forget any state of a finished (or failed) sequence (stateless policies keep none)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}


class FullPolicy(SelectionPolicy):
    name = "full"

    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        if ctx.capacity != keys.shape[2]:
            raise ValueError(f"policy 'full' cannot keep {ctx.capacity} of {keys.shape[2]} tokens")
        return None


class SlidingPolicy(SelectionPolicy):
    name = "sliding"

    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        s, h, n, _ = keys.shape
        idx = torch.arange(n - ctx.capacity, n, device=keys.device)
        return idx.expand(s, h, -1).contiguous()


class StreamingPolicy(SelectionPolicy):
    name = "streaming"

    def __init__(self, num_sinks: int = 4) -> None:
        self.num_sinks = num_sinks

    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        s, h, n, _ = keys.shape
        sinks = min(self.num_sinks, ctx.capacity)
        recent = ctx.capacity - sinks
        idx = torch.cat([torch.arange(sinks), torch.arange(n - recent, n)]).to(keys.device)
        return idx.expand(s, h, -1).contiguous()

    def describe(self) -> dict:
        return {"name": self.name, "num_sinks": self.num_sinks}


class H2OPolicy(SelectionPolicy):
    """Heavy hitters: the attention every kept token has received from all queries of all
    scales so far (per sequence, layer and head), plus a recent window."""

    name = "h2o"
    observes_every_step = True

    def __init__(self, recent_ratio: float = 0.5) -> None:
        self.recent_ratio = recent_ratio
        self._acc: dict[tuple[int, int], torch.Tensor] = {}  # (seq, layer) -> [H, kept] scores

    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        s, h, n, _ = keys.shape
        cur = all_query_scores(q, keys, ctx.softmax_scale)
        prev = []
        for seq in ctx.seqs:
            acc = self._acc.get((seq, ctx.layer))
            if acc is None:
                acc = torch.zeros(h, 0, device=keys.device)
            if acc.shape[1] != ctx.hist_len:
                raise RuntimeError(f"h2o: state of sequence {seq} layer {ctx.layer} has {acc.shape[1]} tokens, "
                                   f"history has {ctx.hist_len}")
            prev.append(acc)
        total = cur + F.pad(torch.stack(prev), (0, n - ctx.hist_len))
        if ctx.capacity >= n:
            for j, seq in enumerate(ctx.seqs):
                self._acc[(seq, ctx.layer)] = total[j]
            return None
        recent = min(ctx.capacity, int(ctx.capacity * self.recent_ratio))
        idx = topk_keep(total, torch.arange(n - recent, n), ctx.capacity)
        kept = total.gather(2, idx)
        for j, seq in enumerate(ctx.seqs):
            self._acc[(seq, ctx.layer)] = kept[j]
        return idx

    def release(self, seq: int) -> None:
        for key in [k for k in self._acc if k[0] == seq]:
            del self._acc[key]

    @property
    def num_tracked(self) -> int:
        return len(self._acc)

    def describe(self) -> dict:
        return {"name": self.name, "recent_ratio": self.recent_ratio}


class WindowPolicy(SelectionPolicy):
    """SnapKV-style window scoring; ``window`` is ``"last"`` (SnapKV, PyramidKV) or ``"grid"``
    (ScaleKV). ``score_queries="all"`` scores by every current query instead of the window
    (and forces nothing); ``score`` is ``"softmax"`` or ``"logits"`` (see the module doc)."""

    def __init__(self, name: str, window: str, window_size: int = 16, pool_kernel: int = 5,
                 pooling: str = "max", score_queries: str = "window", score: str = "softmax") -> None:
        if window not in ("last", "grid"):
            raise ValueError(f"window: expected 'last' or 'grid', got {window!r}")
        if score_queries not in SCORE_QUERIES:
            raise ValueError(f"score_queries: expected one of {', '.join(SCORE_QUERIES)}, got {score_queries!r}")
        if score not in SCORES:
            raise ValueError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling: expected 'max' or 'avg', got {pooling!r}")
        if pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel: must be an odd number >= 1, got {pool_kernel}")
        if window_size < 1:
            raise ValueError(f"window_size: must be >= 1, got {window_size}")
        if window == "grid":
            grid_window(4, window_size)  # validates the perfect square early
        self.name, self.window = name, window
        self.window_size, self.pool_kernel, self.pooling = window_size, pool_kernel, pooling
        self.score_queries, self.score = score_queries, score
        self._windows: dict[tuple[int, int], torch.Tensor] = {}

    def window_positions(self, height: int, width: int | None = None) -> torch.Tensor:
        """Window positions within the current ``height x width`` map (square when ``width`` is
        None; cached per map shape)."""
        key = (height, height if width is None else width)
        if key not in self._windows:
            fn = grid_window if self.window == "grid" else last_window
            self._windows[key] = fn(key[0], self.window_size, key[1])
        return self._windows[key]

    def select(self, ctx: SelectionContext, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.score_queries == "all":
            scores = all_query_scores(q, keys, ctx.softmax_scale, self.score)
            scores = pool_scores(scores, self.pool_kernel, self.pooling)
            return topk_keep(scores, torch.zeros(0, dtype=torch.long), ctx.capacity)
        win = self.window_positions(ctx.height, ctx.width).to(q.device)
        scores = window_scores(q[:, :, win], keys, ctx.softmax_scale, self.score)
        forced = win + ctx.hist_len
        scores[..., forced] = 0.0  # the window is kept anyway: do not let it inflate its neighbours
        scores = pool_scores(scores, self.pool_kernel, self.pooling)
        return topk_keep(scores, forced, ctx.capacity)

    def describe(self) -> dict:
        return {"name": self.name, "window": self.window, "window_size": self.window_size,
                "pool_kernel": self.pool_kernel, "pooling": self.pooling, "score_queries": self.score_queries,
                "score": self.score}


def make_policy(name: str, window_size: int = 16, pool_kernel: int | None = None, pooling: str = "max",
                score_queries: str | None = None, score: str | None = None) -> SelectionPolicy:
    """A fresh policy object by name (stateful ones keep per-sequence state: one per engine).

    ``pool_kernel`` / ``score_queries`` / ``score`` (window policies only): None takes the named
    policy's default (``POLICY_DEFAULTS``; else 5 / ``"window"`` / ``"softmax"``)."""
    defaults = POLICY_DEFAULTS.get(name, {})
    pool_kernel = int(defaults.get("pool_kernel", 5)) if pool_kernel is None else pool_kernel
    score_queries = score_queries or str(defaults.get("score_queries", "window"))
    score = score or str(defaults.get("score", "softmax"))
    if name == "full":
        return FullPolicy()
    if name == "sliding":
        return SlidingPolicy()
    if name == "streaming":
        return StreamingPolicy()
    if name == "h2o":
        return H2OPolicy()
    if name in ("snapkv", "pyramidkv", "snapkv-allq"):
        return WindowPolicy(name, "last", window_size, pool_kernel, pooling, score_queries, score)
    if name in ("scalekv", "scalekv-allq"):
        return WindowPolicy(name, "grid", window_size, pool_kernel, pooling, score_queries, score)
    raise ValueError(f"policy: unknown policy {name!r} (available: {', '.join(POLICIES)})")
