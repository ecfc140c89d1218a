"""Calibration: measure which (layer, scale) pairs are drafters and write a ``ScaleProfile``.

A few requests run with the full cache through the reference loop; an attend callback looks at
the post-softmax attention of sampled current-scale queries of every (layer, scale) and computes
the paper's Attention Selectivity Index

    ASI = E_q[ mass on the current map ] x E_q[ sum of the K' largest history weights ]

High ASI: the layer stays on the current map or picks a few sharp history tokens (a refiner,
cheap to compress). Low ASI: attention is spread over the history (a drafter, needs it). Raw
ASI depends on how many tokens a scale has, so it is z-scored within each scale and all
(layer, scale) pairs are ranked globally; the ``num_drafters`` lowest become drafters. So a
scale may have several drafters or none.

Everything is seeded (request seeds, query sampling) and runs in float32, so the same command
writes the same profile. Scale 0 has no history and is not ranked.

Choices the paper leaves open, made here: K' = ``max(1, round(topk_ratio * history))`` (the
paper does not give K'; a fraction keeps the index comparable across scales of very different
history length), both CFG branches count (both are compressed), and ASI averages heads (the
budget is per layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memory.profile import CalibrationSettings, ScaleProfile

from .models.registry import LoadedInfinity, LoadedModel
from .reference import ContiguousKVCache, run_scales
from .request import ImageRequest

__all__ = ["ASIRecorder", "AttentionRecorder", "attention_report", "calibrate", "calibrate_infinity",
           "plot_attention_report",
           "rank_drafters", "timed_calibrate", "zscore_within_scales"]


class ASIRecorder(ContiguousKVCache):
    """The reference cache, also recording the two ASI factors per (scale, layer)."""

    def __init__(self, model: LoadedModel | LoadedInfinity, num_queries: int, topk_ratio: float, seed: int,
                 scale_lengths: list[int] | None = None) -> None:
        """``scale_lengths``: tokens per scale of the schedule being run (Infinity: h w of each
        grid of the calibrated schedule); None: the VAR model's square schedule."""
        if scale_lengths is None:
            super().__init__(model)
            scale_lengths = model.spec.var.scale_lengths()
        else:
            super().__init__(softmax_scales=model.softmax_scales)
        self.num_queries, self.topk_ratio = num_queries, topk_ratio
        self.scale_index = 0
        k, depth = len(scale_lengths), len(self.softmax_scales)
        self.current_mass = torch.zeros(k, depth, dtype=torch.float64)
        self.history_topk = torch.zeros(k, depth, dtype=torch.float64)
        self.calls = torch.zeros(k, depth, dtype=torch.float64)
        gen = torch.Generator().manual_seed(seed)
        # the same sampled query positions for every layer and request of a scale
        self.queries = [torch.randperm(n, generator=gen)[: num_queries].sort().values for n in scale_lengths]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hist = 0 if self.k[layer] is None else self.k[layer].shape[2]
        out = super().attend(layer, q, k, v)
        if hist == 0:
            return out
        si = self.scale_index
        qs = q[:, :, self.queries[si].to(q.device)].float()
        keys = self.k[layer].float()
        probs = (qs @ keys.transpose(-1, -2) * self.softmax_scales[layer]).softmax(dim=-1)  # [B, H, nq, hist + Lq]
        kk = min(hist, max(1, round(self.topk_ratio * hist)))
        self.current_mass[si, layer] += float(probs[..., hist:].sum(-1).mean())
        self.history_topk[si, layer] += float(probs[..., :hist].topk(kk, dim=-1).values.sum(-1).mean())
        self.calls[si, layer] += 1
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.calls.clamp_min(1)
        return self.current_mass / n, self.history_topk / n


def zscore_within_scales(asi: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(ASI - mean over layers) / (std over layers + eps), per scale; scale 0 stays 0."""
    z = torch.zeros_like(asi)
    rows = asi[1:]
    z[1:] = (rows - rows.mean(dim=1, keepdim=True)) / (rows.std(dim=1, unbiased=False, keepdim=True) + eps)
    return z


def rank_drafters(z: torch.Tensor, num_drafters: int) -> list[list[int]]:
    """The ``num_drafters`` (scale, layer) pairs with the lowest z (scale 0 excluded; ties
    broken by scale then layer, so the result is deterministic); per scale, sorted layers."""
    k, depth = z.shape
    pairs = sorted((float(z[si, la]), si, la) for si in range(1, k) for la in range(depth))
    out: list[list[int]] = [[] for _ in range(k)]
    for _z, si, la in pairs[:num_drafters]:
        out[si].append(la)
    return [sorted(x) for x in out]


@torch.no_grad()
def calibrate(
    model: LoadedModel,
    num_requests: int = 10,
    seed: int = 0,
    num_queries: int = 64,
    topk_ratio: float = 0.1,
    num_drafters: int | None = None,
    dtype: str = "float32",
    texts: list[torch.Tensor] | None = None,
    h_div_w: float = 1.0,
    resolution: str | int | None = None,
) -> ScaleProfile:
    """Run ``num_requests`` full-cache requests (classes 0, 1, ..., seeds seed, seed+1, ...,
    the model's default sampling) and derive the profile. ``num_drafters`` defaults to one per
    scale that has a history (``num_scales - 1``).

    An Infinity model (``LoadedInfinity``) is calibrated on prompts instead: ``texts`` (prompt
    encoder states, one request each; ``num_requests`` is ignored) at one aspect ratio and
    resolution, see ``calibrate_infinity``."""
    if isinstance(model, LoadedInfinity):
        if texts is None:
            raise ValueError("texts: calibrating an Infinity model needs prompt encoder states (texts)")
        return calibrate_infinity(model, texts, h_div_w=h_div_w, resolution=resolution, seed=seed,
                                  num_queries=num_queries, topk_ratio=topk_ratio, num_drafters=num_drafters,
                                  dtype=dtype)
    spec = model.spec
    var_config = spec.var
    if num_requests < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num_requests}")
    if num_queries < 1:
        raise ValueError(f"num_queries: must be >= 1, got {num_queries}")
    if not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio: must be in (0, 1], got {topk_ratio}")
    pairs = (var_config.num_scales - 1) * var_config.depth
    n_d = var_config.num_scales - 1 if num_drafters is None else num_drafters
    if not 0 <= n_d <= pairs:
        raise ValueError(f"num_drafters: must be in 0..{pairs} ((scales - 1) x layers), got {n_d}")
    reqs = [ImageRequest(class_label=i % var_config.num_classes, seed=seed + i, cfg=spec.default_cfg,
                         top_k=spec.default_top_k, top_p=spec.default_top_p) for i in range(num_requests)]
    rec = ASIRecorder(model, num_queries, topk_ratio, seed)
    run_scales(model, reqs, cache=rec, dtype=dtype)
    cur, top = rec.factors()
    asi = cur * top
    z = zscore_within_scales(asi)
    drafters = rank_drafters(z, n_d)
    settings = CalibrationSettings(num_requests=num_requests, seed=seed, num_queries=num_queries,
                                   topk_ratio=topk_ratio, num_drafters=n_d, cfg=float(spec.default_cfg),
                                   top_k=int(spec.default_top_k), top_p=float(spec.default_top_p), dtype=dtype,
                                   weights=model.source)

    def table(t: torch.Tensor) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(round(float(x), 8) for x in row) for row in t.tolist())  # as stored in JSON

    return ScaleProfile(model=spec.name, patch_nums=tuple(var_config.patch_nums), depth=var_config.depth,
                        drafters=tuple(tuple(d) for d in drafters), asi=table(asi), zscore=table(z),
                        current_mass=table(cur), history_topk=table(top), settings=settings)


def _tables_profile(name: str, schedule: tuple, depth: int, rec: ASIRecorder, num_drafters: int,
                    settings: CalibrationSettings) -> ScaleProfile:
    cur, top = rec.factors()
    asi = cur * top
    z = zscore_within_scales(asi)
    drafters = rank_drafters(z, num_drafters)

    def table(t: torch.Tensor) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(round(float(x), 8) for x in row) for row in t.tolist())  # as stored in JSON

    return ScaleProfile(model=name, patch_nums=tuple(schedule), depth=depth,
                        drafters=tuple(tuple(d) for d in drafters), asi=table(asi), zscore=table(z),
                        current_mass=table(cur), history_topk=table(top), settings=settings)


@torch.no_grad()
def calibrate_infinity(
    loaded: LoadedInfinity,
    texts: list[torch.Tensor],
    h_div_w: float = 1.0,
    resolution: str | int | None = None,
    seed: int = 0,
    num_queries: int = 64,
    topk_ratio: float = 0.1,
    num_drafters: int | None = None,
    dtype: str = "float32",
) -> ScaleProfile:
    """Calibrate an Infinity model on prompts: one full-cache request per ``texts`` entry
    (prompt encoder states ``[T, text_channels]``; seeds seed, seed+1, ..., the model's default
    sampling) at one aspect ratio (snapped to the nearest template) and resolution, through
    ``run_infinity_scales`` with an ASI-recording cache. The profile's ``patch_nums`` is that
    schedule's (h, w) grids: scalekv serves requests of exactly that schedule with it."""
    from .infinity_reference import TextImageRequest, run_infinity_scales

    spec, cfg = loaded.spec, loaded.spec.model
    if not texts:
        raise ValueError("texts: need at least one prompt")
    if num_queries < 1:
        raise ValueError(f"num_queries: must be >= 1, got {num_queries}")
    if not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio: must be in (0, 1], got {topk_ratio}")
    for i, t in enumerate(texts):
        if t.dim() != 2 or t.shape[1] != cfg.text_channels:
            raise ValueError(f"texts[{i}]: expected [T, {cfg.text_channels}] encoder states, got {tuple(t.shape)}")
    ratio = cfg.nearest_ratio(h_div_w)
    schedule = cfg.schedule(ratio, resolution)
    k = len(schedule)
    pairs = (k - 1) * cfg.depth
    n_d = k - 1 if num_drafters is None else num_drafters
    if not 0 <= n_d <= pairs:
        raise ValueError(f"num_drafters: must be in 0..{pairs} ((scales - 1) x layers), got {n_d}")
    reqs = [TextImageRequest(text=t[: cfg.text_maxlen], seed=seed + i, h_div_w=ratio, resolution=resolution).resolved(
        loaded) for i, t in enumerate(texts)]
    rec = ASIRecorder(loaded, num_queries, topk_ratio, seed, scale_lengths=[h * w for h, w in schedule])
    run_infinity_scales(loaded, reqs, cache=rec, dtype=dtype)
    r0 = reqs[0]
    settings = CalibrationSettings(num_requests=len(texts), seed=seed, num_queries=num_queries, topk_ratio=topk_ratio,
                                   num_drafters=n_d, cfg=float(r0.cfg), top_k=int(r0.top_k), top_p=float(r0.top_p),
                                   dtype=dtype, weights=loaded.source)
    return _tables_profile(spec.name, schedule, cfg.depth, rec, n_d, settings)


def timed_calibrate(model: LoadedModel, **kw) -> tuple[ScaleProfile, float]:
    """``calibrate`` and its wall time in seconds (reported, not stored: the profile is
    deterministic)."""
    t0 = time.perf_counter()
    prof = calibrate(model, **kw)
    return prof, time.perf_counter() - t0


# ----- the attention report: where each (scale, layer) looks -----------------------------
@dataclass
class AttentionStats:
    """Accumulates per-(scale, layer) attention statistics during generation."""

    num_scales: int
    num_layers: int

    def __post_init__(self) -> None:
        self.current_mass = torch.zeros(self.num_scales, self.num_layers, dtype=torch.float64)
        self.entropy = torch.zeros(self.num_scales, self.num_layers, dtype=torch.float64)
        self.count = torch.zeros(self.num_scales, dtype=torch.float64)

    def report(self) -> dict:
        n = self.count.clamp_min(1)[:, None]
        return {
            "current_scale_mass": (self.current_mass / n).tolist(),
            "entropy_nats": (self.entropy / n).tolist(),
        }


class AttentionRecorder(ContiguousKVCache):
    """The reference cache, also recording attention statistics of the conditional branch."""

    def __init__(self, model: LoadedModel, stats: AttentionStats, batch: int, max_queries: int) -> None:
        super().__init__(model)
        self.stats, self.batch, self.max_queries = stats, batch, max_queries

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = super().attend(layer, q, k, v)
        keys = self.k[layer][: self.batch].float()
        lq = q.shape[2]
        step = max(1, lq // self.max_queries)
        qs = q[: self.batch, :, ::step].float()
        probs = (qs @ keys.transpose(-1, -2) * self.softmax_scales[layer]).softmax(-1)  # [B, H, q, Lcum]
        hist = keys.shape[2] - lq
        cur = probs[..., hist:].sum(-1)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        si = self.scale_index
        self.stats.current_mass[si, layer] += float(cur.mean()) * self.batch
        self.stats.entropy[si, layer] += float(ent.mean()) * self.batch
        if layer == len(self.softmax_scales) - 1:
            self.stats.count[si] += self.batch
        return out


@torch.no_grad()
def attention_report(model: LoadedModel, requests: list[ImageRequest], max_queries: int = 64,
                     dtype: str = "float32") -> dict:
    """Generate ``requests`` with the reference loop, recording attention per (scale, layer)."""
    spec = model.spec
    b, num_scales = len(requests), spec.var.num_scales
    stats = AttentionStats(num_scales, spec.var.depth)
    cache = AttentionRecorder(model, stats, b, max_queries)
    run_scales(model, requests, cache=cache, dtype=dtype)
    rep = stats.report()
    rep.update({"model": spec.name, "patch_nums": list(spec.var.patch_nums), "depth": spec.var.depth,
                "num_requests": b, "max_queries_per_scale": max_queries})
    mass = torch.tensor(rep["current_scale_mass"])[1:]  # scale 0 has no history
    rep["summary"] = {
        "min_current_mass": float(mass.min()),
        "max_current_mass": float(mass.max()),
        # scale index -> layers putting more than half of their attention on the current scale
        "layers_mostly_current": {str(s + 1): [la for la in range(spec.var.depth) if mass[s, la] > 0.5]
                                  for s in range(mass.shape[0])},
    }
    return rep


def plot_attention_report(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = torch.tensor(report["current_scale_mass"])
    ent = torch.tensor(report["entropy_nats"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data, title, cmap in ((axes[0], mass, "attention mass on the current scale", "viridis"),
                                  (axes[1], ent, "attention entropy (nats)", "magma")):
        im = ax.imshow(data.T.numpy(), aspect="auto", origin="lower", cmap=cmap)
        ax.set_xlabel("scale (side)")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(report["patch_nums"])), [str(p) for p in report["patch_nums"]])
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{report['model']}: attention per (scale, layer), {report['num_requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
