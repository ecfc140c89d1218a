"""The reference scale-by-scale loop for Infinity (text-to-image), a sibling of
``reference.run_scales`` with the same structure: one batch, CFG as [cond ; uncond] rows, every
layer's self-attention through a ``ContiguousKVCache`` (its ``attend`` hook), only guided logits
sampled and both halves fed the same tokens.

Differences from VAR: requests carry text encoder states (a tensor per request; ``engine.text``
makes them from a prompt), the unconditional row uses the learned ``cfg_uncond`` (or a negative
prompt), the text's cross-attention K/V are computed once per request and reused at every scale,
every bit is sampled from its own 2-way softmax, guidance is constant (cfg * cond + (1 - cfg) *
uncond after dividing by tau), and the schedule depends on the request's aspect ratio and
resolution (one schedule per batch here; a paged engine can mix them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .models.bsq import NextScaleState
from .models.registry import LoadedInfinity
from .precision import autocast_for
from .reference import ContiguousKVCache, image_to_uint8
from .sampling import make_generator, sample_scale_bits


@dataclass(frozen=True)
class TextImageRequest:
    """One text-to-image request. ``text``: the prompt's encoder states [T, text_channels]
    (padding removed). None sampling fields take the model's defaults (``resolved``)."""

    text: torch.Tensor
    seed: int = 0
    cfg: float | None = None
    tau: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    h_div_w: float = 1.0  # aspect ratio height / width; the nearest template is used
    resolution: str | int | None = None  # a named resolution ("1M") or a number of scales
    negative_text: torch.Tensor | None = None  # replaces the learned unconditional text
    request_id: str = ""

    def resolved(self, loaded: LoadedInfinity) -> TextImageRequest:
        spec = loaded.spec
        return replace(
            self,
            cfg=spec.default_cfg if self.cfg is None else self.cfg,
            tau=spec.default_tau if self.tau is None else self.tau,
            top_k=spec.default_top_k if self.top_k is None else self.top_k,
            top_p=spec.default_top_p if self.top_p is None else self.top_p,
            resolution=spec.model.default_resolution if self.resolution is None else self.resolution,
        )

    def schedule(self, loaded: LoadedInfinity) -> tuple[tuple[int, int], ...]:
        return loaded.spec.model.schedule(self.h_div_w, self.resolution)

    def rope_grid(self, loaded: LoadedInfinity) -> tuple[int, int]:
        """The grid RoPE positions are normalised to: the last grid of the full schedule."""
        return loaded.spec.model.full_schedule(self.h_div_w)[-1]


@dataclass
class TextImageResult:
    request_id: str
    seed: int
    tokens: list[torch.Tensor]  # bits of each scale [h w, token_bits], uint8
    image: object = None  # uint8 [H, W, 3] numpy
    kv_peak_bytes: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def _check_batch(loaded: LoadedInfinity, requests: list[TextImageRequest]) -> None:
    cfg = loaded.spec.model
    first = requests[0]
    for r in requests:
        if None in (r.cfg, r.tau, r.top_k, r.top_p, r.resolution):
            raise ValueError("requests must be resolved (TextImageRequest.resolved)")
        if r.tau <= 0:
            raise ValueError(f"tau must be > 0, got {r.tau}")
        if (cfg.nearest_ratio(r.h_div_w), r.schedule(loaded)) != (cfg.nearest_ratio(first.h_div_w),
                                                                  first.schedule(loaded)):
            raise ValueError("one batch of the reference loop shares one schedule (aspect ratio and resolution)")


@torch.no_grad()
def run_infinity_scales(
    loaded: LoadedInfinity,
    requests: list[TextImageRequest],
    cache: ContiguousKVCache | None = None,
    dtype: str = "float32",
    forced_tokens: list[torch.Tensor] | None = None,
    return_logits: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor, ContiguousKVCache] | tuple[list, torch.Tensor, ContiguousKVCache, list]:
    """Generate every scale for a batch of resolved requests sharing one schedule.

    Returns the bits of each scale [B, h w, token_bits], the accumulated codes f_hat
    [B, d, H, W] and the cache (and, with ``return_logits``, each scale's unguided logits
    [2B, h w, 2 token_bits]). ``forced_tokens``: bits of the first scales used instead of the
    sampled ones (sampling still runs, so each generator stays on its own stream)."""
    if not requests:
        raise ValueError("no requests")
    _check_batch(loaded, requests)
    model, tok = loaded.model, loaded.tokenizer
    schedule = requests[0].schedule(loaded)
    angles = model.rope(schedule, requests[0].rope_grid(loaded))
    forced = forced_tokens or []
    bits = loaded.spec.model.token_bits
    for si, t in enumerate(forced):
        want = (len(requests), schedule[si][0] * schedule[si][1], bits)
        if tuple(t.shape) != want:
            raise ValueError(f"forced_tokens[{si}]: expected shape {want}, got {tuple(t.shape)}")
    device = model.pos_start.device
    b = len(requests)
    generators = [make_generator(r.seed) for r in requests]
    cache = cache or ContiguousKVCache(softmax_scales=loaded.softmax_scales)
    state = NextScaleState(tok, schedule, b, device)
    tokens: list[torch.Tensor] = []
    all_logits = []
    nxt = None
    with autocast_for(dtype, device):
        cond = model.cfg_condition([r.text for r in requests], [r.negative_text for r in requests])
        for si in range(len(schedule)):
            cache.scale_index = si
            x = model.embed_scale(si, cond, None if si == 0 else torch.cat((nxt, nxt)))
            logits = model.logits(model.run_blocks(x, cond, cache.attend, angles[si]), cond)
            if return_logits:
                all_logits.append(logits)
            idx = sample_scale_bits(logits[:b], logits[b:], requests, generators).to(device)
            if si < len(forced):
                idx = forced[si].to(device=device, dtype=idx.dtype)
            tokens.append(idx)
            nxt = state.add(si, idx)
    if return_logits:
        return tokens, state.f_hat, cache, all_logits
    return tokens, state.f_hat, cache


@torch.no_grad()
def generate_infinity_reference(
    loaded: LoadedInfinity, requests: list[TextImageRequest], dtype: str = "float32"
) -> list[TextImageResult]:
    """Resolve, generate and decode one image per request (one batch per schedule)."""
    requests = [r.resolved(loaded) for r in requests]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (loaded.spec.model.nearest_ratio(r.h_div_w), r.schedule(loaded))
        groups.setdefault(key, []).append(i)
    results: list[TextImageResult | None] = [None] * len(requests)
    for rows in groups.values():
        t0 = time.perf_counter()
        batch = [requests[i] for i in rows]
        tokens, f_hat, cache = run_infinity_scales(loaded, batch, dtype=dtype)
        images = image_to_uint8(loaded.tokenizer.decode(f_hat))
        seconds = time.perf_counter() - t0
        for j, i in enumerate(rows):
            r = requests[i]
            results[i] = TextImageResult(
                request_id=r.request_id, seed=r.seed, tokens=[t[j].cpu() for t in tokens], image=images[j].numpy(),
                kv_peak_bytes=cache.nbytes() // len(batch), seconds=seconds,
                stats={"schedule": [list(hw) for hw in r.schedule(loaded)], "h_div_w": r.h_div_w})
    return results
