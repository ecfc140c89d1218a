"""Requests, classifier-free guidance and seeded top-k/top-p sampling.

Sampling is per request: each request owns a ``torch.Generator`` seeded with its seed and draws
exactly one uniform vector per scale, so its tokens depend only on its own logits and seed,
never on which other requests share its batch or step.
"""

from __future__ import annotations

import torch

from .request import ImageRequest


def guidance_weight(cfg: float, scale_index: int, num_scales: int) -> float:
    """VAR's linear ramp: t = cfg * k / (K - 1), from no guidance at the first scale."""
    return cfg * scale_index / max(num_scales - 1, 1)


def guide(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond."""
    return (1 + t) * logits_cond - t * logits_uncond


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of ``logits`` [N, V]; removed entries become -inf.

    top-p removes the tokens whose ascending cumulative probability is <= 1 - p, always keeping
    the most likely token. ``top_k`` 0 and ``top_p`` 0 (or >= 1) disable each filter.
    """
    logits = logits.float()
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def pick_from_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF lookup: the token of each row of ``cdf`` [N, V] (non-decreasing cumulative
    probabilities) for the point ``u`` [N] or [N, 1] in [0, cdf[:, -1]]; returns [N] indices.

    The pick is the first token whose cdf *exceeds* u (a right-sided search), so token i owns
    the half-open interval [cdf[i-1], cdf[i]) and a token of probability 0 (filtered out: its
    interval is empty) is never picked, not even for u == 0, where a left-sided search
    (first cdf >= u) would return a filtered token 0 with cdf[0] == 0. For every u > 0 that is
    not exactly equal to some cdf[i] both searches give the same token; on such an exact tie
    u == cdf[i] the right search gives the next token of positive probability instead of
    token i (the tie point belongs to the interval above it). The only u no cdf entry exceeds
    is u == cdf[:, -1], which ``rand * total`` can reach by rounding; there the pick falls back
    to the first token whose cdf reaches u (the token where the cdf reaches its total, so of
    positive probability), which is also what the left-sided search gives.
    """
    u = u.reshape(-1, 1).to(cdf.dtype)
    v = cdf.shape[-1]
    right = torch.searchsorted(cdf, u, right=True)
    left = torch.searchsorted(cdf, u).clamp_max(v - 1)
    return torch.where(right < v, right, left).squeeze(-1)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row of ``logits`` [N, V] with one uniform per row
    (see ``pick_from_cdf``: tokens filtered to -inf are never drawn)."""
    probs = logits.float().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device="cpu").to(cdf.device) * cdf[:, -1:]
    return pick_from_cdf(cdf, u)


def sample_scale(
    logits_cond: torch.Tensor,
    logits_uncond: torch.Tensor,
    requests: list[ImageRequest],
    generators: list[torch.Generator],
    scale_index: int,
    num_scales: int,
) -> torch.Tensor:
    """Guided sampling of one scale for a batch of requests: logits [B, p^2, V] -> tokens [B, p^2].

    Batched across requests (one guidance, one filter per distinct (top_k, top_p), one softmax,
    one lookup) with one host-to-device copy of the uniforms and no device-to-host copy; each
    request still draws its own ``p^2`` uniforms from its own generator, exactly as a per-request
    loop does, and every operation here is row-wise, so the tokens are those of sampling each
    request alone (``tests/test_sampling.py`` checks this against the loop)."""
    b, n, v = logits_cond.shape
    if b != len(requests) or b != len(generators):
        raise ValueError(f"{b} logit rows for {len(requests)} requests and {len(generators)} generators")
    device = logits_cond.device
    ts = [guidance_weight(float(r.cfg), scale_index, num_scales) for r in requests]
    # (1 + t) and t as float32 tensors: the same per-element products as Python-float scalars
    # (a CPU scalar operand of a float32 op is rounded to float32 before it multiplies).
    coef = torch.tensor([[1 + t for t in ts], ts], dtype=logits_cond.dtype)
    # one uniform vector per request, drawn from its generator on the host as before
    u = torch.cat([torch.rand(n, 1, generator=g, device="cpu") for g in generators]) if b else torch.empty(0, 1)
    if device.type == "cuda":
        coef, u = coef.pin_memory(), u.pin_memory()
    coef = coef.to(device, non_blocking=True)
    u = u.to(device, non_blocking=True)
    guided = coef[0].view(b, 1, 1) * logits_cond - coef[1].view(b, 1, 1) * logits_uncond
    filt = [(int(r.top_k), float(r.top_p)) for r in requests]
    if len(set(filt)) <= 1:
        k, p = filt[0] if filt else (0, 0.0)
        rows = filter_logits(guided.reshape(b * n, v), k, p)
    else:  # requests with different filters: one batched call per distinct filter
        rows = torch.empty((b, n, v), dtype=torch.float32, device=device)
        for key in dict.fromkeys(filt):
            idx = [i for i, f in enumerate(filt) if f == key]
            sel = torch.tensor(idx, device=device) if len(idx) < b else slice(None)
            rows[sel] = filter_logits(guided[sel].reshape(len(idx) * n, v), *key).view(len(idx), n, v)
        rows = rows.view(b * n, v)
    cdf = rows.float().softmax(dim=-1).cumsum(dim=-1)
    return pick_from_cdf(cdf, u * cdf[:, -1:]).view(b, n)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


# ----- Infinity: bitwise tokens --------------------------------------------------------------
def guide_constant(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Infinity's guidance on logits, the same weight at every scale: cfg * cond + (1 - cfg) * uncond."""
    return cfg * logits_cond + (1 - cfg) * logits_uncond


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Sample every bit of every token independently from its 2-way softmax.

    ``logits`` [l, 2 d] (already guided and divided by tau; bit j is entries 2j, 2j + 1) ->
    bits [l, d] uint8. top-p drops a bit value whose probability is at most 1 - top_p (top-k
    >= 2 changes nothing with 2 values). One uniform per bit from ``generator``, inverse-CDF
    as in ``sample_from_logits``.
    """
    n_tok = logits.shape[0]
    pairs = filter_logits(logits.reshape(-1, 2), top_k, top_p)
    probs = pairs.softmax(dim=-1)
    u = torch.rand(pairs.shape[0], generator=generator, device="cpu").to(probs.device)
    # cdf = [p0, 1]: bit 1 exactly when u >= p0 (so a filtered value, p = 0, is never drawn)
    return (u >= probs[:, 0]).to(torch.uint8).view(n_tok, -1)


def sample_scale_bits(
    logits_cond: torch.Tensor,
    logits_uncond: torch.Tensor,
    params: list,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Guided bit sampling of one scale for a batch: logits [B, l, 2 d] -> bits [B, l, d].

    ``params[b]`` has ``cfg``, ``tau``, ``top_k``, ``top_p`` (resolved). As in the released
    loop, logits are divided by tau before guidance."""
    out = []
    for b, p in enumerate(params):
        tau = float(p.tau)
        row = guide_constant(logits_cond[b].float() / tau, logits_uncond[b].float() / tau, float(p.cfg))
        out.append(sample_bits(row, int(p.top_k), float(p.top_p), generators[b]))
    return torch.stack(out)
