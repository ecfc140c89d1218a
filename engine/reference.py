"""The textbook VAR inference loop: the correctness oracle and the naive baseline.

One batch of requests runs all scales together. CFG doubles the batch into [cond ; uncond]
sequences; every layer keeps a contiguous K/V tensor that grows by ``torch.cat`` at every scale.
Only guided logits are sampled and both CFG halves receive the same tokens.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .models.registry import LoadedModel
from .models.vqvae import NextScaleInput
from .precision import autocast_for
from .requests import GenerationRequest, GenerationResult
from .sampling import make_generator, sample_scale


def image_to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return img.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class ContiguousKVCache:
    """Per-layer K/V tensors [2B, H, L_cum, D], grown with ``torch.cat`` at every scale."""

    def __init__(self, model: LoadedModel) -> None:
        self.scales = [b.attn.scale for b in model.var.blocks]
        self.k: list[torch.Tensor | None] = [None] * len(self.scales)
        self.v: list[torch.Tensor | None] = [None] * len(self.scales)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return F.scaled_dot_product_attention(q, k, v, scale=self.scales[layer])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@torch.no_grad()
def generate_reference(
    model: LoadedModel,
    requests: list[GenerationRequest],
    dtype: str = "float32",
    forced_tokens: list[torch.Tensor] | None = None,
) -> list[GenerationResult]:
    """Generate one image per request in a single batch (requests must be resolved: cfg, top_k
    and top_p set). ``kv_peak_bytes`` is the batch's cache at its peak divided among requests.

    ``forced_tokens`` (a diagnostic): tokens [B, p_k^2] of the first ``len(forced_tokens)`` scales,
    used instead of sampling them (the model still runs those scales, so its cache is the one
    it would have built had it sampled exactly these tokens). Forcing a real image's coarse
    scales and sampling the rest shows at which scales a model loses what the image should be.
    """
    if not requests:
        return []
    forced = forced_tokens or []
    if len(forced) > model.spec.var.num_scales:
        raise ValueError(f"forced_tokens: {len(forced)} scales given, the model has {model.spec.var.num_scales}")
    for si, t in enumerate(forced):
        want = (len(requests), model.spec.var.patch_nums[si] ** 2)
        if tuple(t.shape) != want:
            raise ValueError(f"forced_tokens[{si}]: expected shape {want}, got {tuple(t.shape)}")
    t0 = time.perf_counter()
    var, vae, spec = model.var, model.vae, model.spec
    device = next(var.parameters()).device
    num_scales, b = spec.var.num_scales, len(requests)
    labels = torch.tensor([r.class_label for r in requests] + [spec.var.num_classes] * b, device=device)
    generators = [make_generator(r.seed) for r in requests]
    cache = ContiguousKVCache(model)
    state = NextScaleInput(vae.quantize, b, device)
    tokens: list[torch.Tensor] = []
    next_input = None
    with autocast_for(dtype, device):
        cond = var.condition(labels)
        for si in range(num_scales):
            x = var.embed_scale(si, cond, None if si == 0 else torch.cat((next_input, next_input)))
            logits = var.logits(var.run_blocks(x, cond, cache.attend), cond)
            idx = sample_scale(logits[:b], logits[b:], requests, generators, si, num_scales).to(device)
            if si < len(forced):  # sampled anyway, so each request's generator stays on its own stream
                idx = forced[si].to(device=device, dtype=idx.dtype)
            tokens.append(idx)
            next_input = state.add(si, idx)
    images = image_to_uint8(vae.fhat_to_img(state.f_hat))
    seconds = time.perf_counter() - t0
    flat = torch.cat(tokens, dim=1).cpu()
    per_request_kv = cache.nbytes() // b
    return [
        GenerationResult(
            request_id=r.request_id,
            class_label=r.class_label,
            seed=r.seed,
            tokens=flat[i].tolist(),
            image=images[i].numpy(),
            kv_peak_bytes=per_request_kv,
            seconds=seconds,
        )
        for i, r in enumerate(requests)
    ]
