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
from .precision import inference_context, inference_module
from .request import ImageRequest, ImageResult
from .sampling import make_generator, sample_scale


def image_to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return img.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class ContiguousKVCache:
    """Per-layer K/V tensors [2B, H, L_cum, D], grown with ``torch.cat`` at every scale.

    ``attend`` is the hook the transformer blocks call; subclasses that record attention
    statistics (calibration, the attention report) override it and read ``scale_index``,
    which ``run_scales`` sets before each scale."""

    def __init__(self, model: LoadedModel | None = None, softmax_scales: list[float] | None = None) -> None:
        if softmax_scales is None:
            softmax_scales = [b.attn.softmax_scale for b in model.var.blocks]
        self.softmax_scales = list(softmax_scales)
        self.k: list[torch.Tensor | None] = [None] * len(self.softmax_scales)
        self.v: list[torch.Tensor | None] = [None] * len(self.softmax_scales)
        self.scale_index = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scales[layer])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@torch.no_grad()
def run_scales(
    model: LoadedModel,
    requests: list[ImageRequest],
    cache: ContiguousKVCache | None = None,
    dtype: str = "float32",
    forced_tokens: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, ContiguousKVCache]:
    """The one scale-by-scale generation loop (VAR's ``autoregressive_infer_cfg``): every
    request in one batch, CFG as ``[cond ; uncond]`` rows, the cache ``cache`` (a plain
    ``ContiguousKVCache`` by default, or a recording subclass). Requests must be resolved
    (cfg, top_k and top_p set). Returns the tokens of each scale ``[B, p^2]``, the final
    feature map ``f_hat`` ``[B, C, H, W]`` and the cache.

    ``forced_tokens`` (a diagnostic): tokens [B, p_k^2] of the first ``len(forced_tokens)`` scales,
    used instead of sampling them (the model still runs those scales, so its cache is the one
    it would have built had it sampled exactly these tokens). Forcing a real image's coarse
    scales and sampling the rest shows at which scales a model loses what the image should be.
    """
    vae, spec = model.vae, model.spec
    device = next(model.var.parameters()).device
    var = inference_module(model.var, dtype, device)  # CUDA + bf16: weights cast once, no autocast
    forced = forced_tokens or []
    if len(forced) > spec.var.num_scales:
        raise ValueError(f"forced_tokens: {len(forced)} scales given, the model has {spec.var.num_scales}")
    for si, t in enumerate(forced):
        want = (len(requests), spec.var.patch_nums[si] ** 2)
        if tuple(t.shape) != want:
            raise ValueError(f"forced_tokens[{si}]: expected shape {want}, got {tuple(t.shape)}")
    num_scales, b = spec.var.num_scales, len(requests)
    labels_B2 = torch.tensor([r.class_label for r in requests] + [spec.var.num_classes] * b, device=device)
    generators = [make_generator(r.seed) for r in requests]
    cache = cache or ContiguousKVCache(model)
    state = NextScaleInput(vae.quantize, b, device)
    tokens: list[torch.Tensor] = []
    next_input_BlC = None
    with inference_context(dtype, device):
        cond_B2C = var.condition(labels_B2)
        for si in range(num_scales):
            cache.scale_index = si
            x_B2lC = var.embed_scale(si, cond_B2C, None if si == 0 else torch.cat((next_input_BlC, next_input_BlC)))
            logits_B2lV = var.logits(var.run_blocks(x_B2lC, cond_B2C, cache.attend), cond_B2C)
            idx_Bl = sample_scale(logits_B2lV[:b], logits_B2lV[b:], requests, generators, si, num_scales).to(device)
            if si < len(forced):  # sampled anyway, so each request's generator stays on its own stream
                idx_Bl = forced[si].to(device=device, dtype=idx_Bl.dtype)
            tokens.append(idx_Bl)
            next_input_BlC = state.add(si, idx_Bl)
    return tokens, state.f_hat, cache


@torch.no_grad()
def generate_reference(
    model: LoadedModel,
    requests: list[ImageRequest],
    dtype: str = "float32",
    forced_tokens: list[torch.Tensor] | None = None,
) -> list[ImageResult]:
    """Generate one image per request in a single batch with ``run_scales`` and decode them
    (requests must be resolved). ``kv_peak_bytes`` is the batch's cache at its peak divided
    among requests."""
    if not requests:
        return []
    t0 = time.perf_counter()
    tokens, f_hat, cache = run_scales(model, requests, dtype=dtype, forced_tokens=forced_tokens)
    images = image_to_uint8(model.vae.fhat_to_img(f_hat))
    seconds = time.perf_counter() - t0
    flat = torch.cat(tokens, dim=1).cpu()
    per_request_kv = cache.nbytes() // len(requests)
    return [
        ImageResult(
            request_id=r.request_id,
            class_label=r.class_label,
            seed=r.seed,
            job_id=r.job_id,
            tokens=flat[i].tolist(),
            image=images[i].numpy(),
            kv_peak_bytes=per_request_kv,
            seconds=seconds,
        )
        for i, r in enumerate(requests)
    ]
