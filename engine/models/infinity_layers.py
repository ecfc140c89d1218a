"""Infinity's building blocks: RoPE-2D with STAR-normalised positions, RMSNorm, the tanh-GELU FFN,
cos self-attention (through the ``attend`` hook) and the ungated cross-attention to the text."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import InfinityConfig

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Schedule = Sequence[tuple[int, int]]


# ----- RoPE-2D ------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """head_dim/4 frequencies per axis."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


def star_positions(hw: tuple[int, int], full: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token (row-major) of an ``hw`` grid in the ``full`` grid."""
    h, w = hw
    rows = (torch.arange(h) * (full[0] / h)).round().long()
    cols = (torch.arange(w) * (full[1] / w)).round().long()
    return rows.view(h, 1).expand(h, w).reshape(-1), cols.view(1, w).expand(h, w).reshape(-1)


def rope_angles(cfg: InfinityConfig, schedule: Schedule, full: tuple[int, int]) -> list[torch.Tensor]:
    """Rotation angles [h w, head_dim/2] of every scale of ``schedule``."""
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_base)
    out = []
    for hw in schedule:
        rows, cols = star_positions(tuple(hw), full)
        out.append(torch.cat((torch.outer(rows.float(), inv), torch.outer(cols.float(), inv)), dim=-1))
    return out


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` [B, H, L, D] by ``angles`` [L, D/2] (or [B, L, D/2]), in fp32."""
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


# ----- layers ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused qkv (q/v biases, zero k bias), cos-attention with a learned per-head scale, RoPE."""

    softmax_scale = 1.0

    def __init__(self, layer: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100.0)
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, C] -> q, k, v [B, H, L, D]: q/k normalised, q scaled, both rotated."""
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1) * scale_mul.to(q.dtype)
        k = F.normalize(k, dim=-1)
        return apply_rope(q, angles), apply_rope(k, angles), v

    def forward(self, x: torch.Tensor, angles: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x, angles)
        return self.proj(attend(self.layer, q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, ``pool``) to a request's text.

    Keys/values: ``mat_kv`` (no bias weight) with a zero k bias and a learned v bias; softmax
    scale 1/sqrt(head_dim); no normalisation of q or k."""

    def __init__(self, width: int, kv_dim: int, num_heads: int, pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.pool = pool
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [N, T, kv_dim] -> k, v [N, H, T, D]."""
        n, t, _ = text.shape
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(n, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [N, H, Lq, D], k/v [N, H, T, D], mask [N, T] (True = a real text token)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                              scale=1.0 / math.sqrt(self.head_dim))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                segments: Sequence[int] | None = None) -> torch.Tensor:
        """x [N, L, C] (one row per text row), or packed [1, sum(segments), C] where segment i
        belongs to text row i."""
        b, n, c = x.shape
        q = self.mat_q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if segments is None:
            out = self.attend(q, k.to(q.dtype), v.to(q.dtype), mask)
        else:
            parts, start = [], 0
            for i, length in enumerate(segments):
                qi = q[:, :, start : start + length]
                parts.append(self.attend(qi, k[i : i + 1].to(q.dtype), v[i : i + 1].to(q.dtype), mask[i : i + 1]))
                start += length
            out = torch.cat(parts, dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def pooled(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The learned query's attention over each row's text: [N, T, kv_dim] -> [N, width]."""
        k, v = self.kv(text)
        q = self.mat_q.to(k.dtype).unsqueeze(2).expand(text.shape[0], -1, 1, -1)
        out = self.attend(q, k, v, mask)  # [N, H, 1, D]
        return self.proj(out.transpose(1, 2).reshape(text.shape[0], -1))


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.ca = CrossAttention(cfg.width, cfg.text_channels, cfg.pool_heads, pool=True)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ca.pooled(text, mask)


