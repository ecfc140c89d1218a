"""Infinity: text-to-image next-scale transformer with bitwise logits, state-dict compatible with
the released ``infinity_2b_reg.pth`` and the sharded 8B weights.

Per request, the text (Flan-T5 encoder states, padding dropped) is RMS-normalised
(``text_norm``), pooled by a learned query (``text_proj_for_sos``) into one vector that is both
the start token and the AdaLN condition, and projected (``text_proj_for_ca``) into the
cross-attention memory. The unconditional CFG row uses the learned ``cfg_uncond`` rows (cut to
the prompt's length) or a negative prompt in place of the text.

Every block (``CrossAttnBlock``): shared AdaLN (one ``shared_ada_lin`` for the model plus a
per-block ``ada_gss`` offset, chunks gamma1, gamma2, scale1, scale2, shift1, shift2), cos-
attention with RoPE-2D, an ungated cross-attention to the text on an affine-LayerNormed input,
and a tanh-GELU FFN. The head (``head_nm`` AdaLN + ``head``) gives 2 logits per bit.

As in ``var.py`` the model owns no cache: self-attention calls ``attend(layer, q, k, v)`` with
``[B, H, L, head_dim]`` tensors, q and k L2-normalised (q times its learned per-head scale) and
rotated, softmax scale 1; teacher forcing passes a block-causal attend, the reference loop a
contiguous cache, the paged engine its pool. The text K/V of every layer are computed once per
request (``condition``) and reused at every scale.

RoPE-2D: the first half of a head rotates by the row, the second by the column, adjacent pairs
rotated, frequencies base^(-i / (head_dim/2)) for even i. Positions are STAR-normalised: token
(i, j) of an h x w scale takes the angles of (round(i H / h), round(j W / w)), where H x W is the
last grid of the aspect ratio's full schedule (the 1M grid, also at lower resolutions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import InfinityConfig
from .infinity_layers import (  # noqa: F401  (re-exported)
    FFN,
    AttendFn,
    CrossAttention,
    RMSNorm,
    Schedule,
    SelfAttention,
    TextAttentivePool,
    apply_rope,
    rope_angles,
    rope_inv_freq,
    star_positions,
)


@dataclass
class InfinityCondition:
    """Everything a batch of rows (sequences: [cond of each request ; uncond of each]) needs at
    every scale, computed once: the pooled text (start token and head condition), the shared
    AdaLN output, and every layer's cross-attention K/V of the projected text.

    ``segments``: set for packed inputs ``[1, sum(segments), C]`` in which segment i belongs to
    row i (a paged runner packs all sequences of a step in one row); None for ``[N, L, C]``."""

    pooled: torch.Tensor  # [N, C]
    gss: torch.Tensor  # [N, 1, 6, C]: shared_ada_lin(pooled), before each block's ada_gss
    text_k: list[torch.Tensor]  # per layer [N, H, T, D]
    text_v: list[torch.Tensor]
    text_mask: torch.Tensor  # [N, T] bool
    segments: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        return self.pooled.shape[0]

    def per_token(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor [N, ...] laid out to broadcast over the tokens of x: [N, 1, ...],
        or, packed, one entry per token [1, T, ...]."""
        if self.segments is None:
            return t.unsqueeze(1)
        idx = torch.repeat_interleave(torch.arange(self.rows, device=t.device),
                                      torch.tensor(self.segments, device=t.device))
        return t[idx].unsqueeze(0)

    def packed(self, segments: Sequence[int]) -> InfinityCondition:
        if len(segments) != self.rows:
            raise ValueError(f"segments: {len(segments)} lengths for {self.rows} rows")
        return InfinityCondition(self.pooled, self.gss, self.text_k, self.text_v, self.text_mask, tuple(segments))

    def select(self, rows: Sequence[int] | torch.Tensor) -> InfinityCondition:
        """The condition of a subset of rows (the text padded to the longest of all rows)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.pooled.device)
        return InfinityCondition(self.pooled[idx], self.gss[idx], [k[idx] for k in self.text_k],
                                 [v[idx] for v in self.text_v], self.text_mask[idx])

    @staticmethod
    def cat(conds: Sequence[InfinityCondition]) -> InfinityCondition:
        """Rows of several conditions in order (text padded to the longest)."""
        t = max(c.text_mask.shape[1] for c in conds)

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            extra = t - x.shape[dim]
            if extra == 0:
                return x
            shape = list(x.shape)
            shape[dim] = extra
            return torch.cat((x, x.new_zeros(shape)), dim=dim)

        depth = len(conds[0].text_k)
        return InfinityCondition(
            torch.cat([c.pooled for c in conds]), torch.cat([c.gss for c in conds]),
            [torch.cat([pad(c.text_k[i], 2) for c in conds]) for i in range(depth)],
            [torch.cat([pad(c.text_v[i], 2) for c in conds]) for i in range(depth)],
            torch.cat([pad(c.text_mask, 1) for c in conds]))


class CrossAttnBlock(nn.Module):
    def __init__(self, layer: int, cfg: InfinityConfig) -> None:
        super().__init__()
        c = cfg.width
        self.width = c
        self.layer = layer
        self.sa = SelfAttention(layer, c, cfg.num_heads)
        self.ca = CrossAttention(c, c, cfg.num_heads)
        self.ffn = FFN(c, cfg.ffn_hidden)
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)

    def forward(self, x: torch.Tensor, cond: InfinityCondition, angles: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        # Chunk order (checkpoint layout): gamma1, gamma2, scale1, scale2, shift1, shift2.
        mods = cond.per_token((self.ada_gss[0] + cond.gss[:, 0]).float())  # [N, 1, 6, C] / [1, T, 6, C]
        g1, g2, s1, s2, sh1, sh2 = (m.to(x.dtype) for m in mods.unbind(2))
        x = x + self.sa(self.ln_wo_grad(x) * (s1 + 1) + sh1, angles, attend) * g1
        x = x + self.ca(self.ca_norm(x), cond.text_k[self.layer], cond.text_v[self.layer], cond.text_mask,
                        cond.segments)
        return x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + sh2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: InfinityCondition) -> torch.Tensor:
        scale, shift = cond.per_token(self.ada_lin(cond.pooled).view(-1, 2, self.width)).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class _Chunk(nn.Module):
    """``block_chunks.{c}`` of the released layout: blocks under ``module.{j}``."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.config = cfg
        c = cfg.width
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels))
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        self.text_norm = RMSNorm(cfg.text_channels, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(cfg.text_channels, c), nn.GELU(approximate="tanh"),
                                              nn.Linear(c, c))
        self.lvl_embed = nn.Embedding(cfg.num_lvl, c)
        self.word_embed = nn.Linear(cfg.token_bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        blocks = [CrossAttnBlock(i, cfg) for i in range(cfg.depth)]
        if cfg.block_chunks == 1:
            self.blocks = nn.ModuleList(blocks)
        else:
            n = cfg.blocks_per_chunk
            self.block_chunks = nn.ModuleList(_Chunk(blocks[i : i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)
        if self.cfg_uncond.device.type != "meta":
            self.init_weights()

    @property
    def block_list(self) -> list[CrossAttnBlock]:
        if self.config.block_chunks == 1:
            return list(self.blocks)
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def softmax_scales(self) -> list[float]:
        return [SelfAttention.softmax_scale] * self.config.depth

    # ----- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, aln_init: float = 1e-3, gamma_init: float = 1e-4) -> None:
        """Small-std truncated normals, zero biases, depth-scaled output projections and small
        AdaLN gammas (blocks start near identity); cfg_uncond from a fixed seed."""
        c, depth = self.config.width, self.config.depth
        std = math.sqrt(1 / c / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.text_proj_for_sos.ca.mat_q, std=std)
        gen = torch.Generator().manual_seed(0)
        uncond = torch.empty(self.cfg_uncond.shape)
        nn.init.trunc_normal_(uncond, std=1.2, generator=gen)
        self.cfg_uncond.copy_(uncond / self.config.text_channels**0.5)
        self.head_nm.ada_lin[-1].weight.mul_(aln_init)
        self.head.weight.mul_(0.02)
        for block in self.block_list:
            block.sa.proj.weight.div_(math.sqrt(2 * depth))
            block.ca.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.ada_gss[:, :, :2].mul_(gamma_init)
            block.ada_gss[:, :, 2:].mul_(aln_init)

    # ----- text -> condition ---------------------------------------------------------------
    def uncond_text(self, length: int) -> torch.Tensor:
        """The learned unconditional text of a prompt of ``length`` tokens."""
        if not 1 <= length <= self.config.text_maxlen:
            raise ValueError(f"text length must be in [1, {self.config.text_maxlen}], got {length}")
        return self.cfg_uncond[:length]

    def condition(self, texts: Sequence[torch.Tensor]) -> InfinityCondition:
        """Text encoder states of each row ([T_i, text_channels], padding removed) ->
        the rows' condition. For CFG pass [cond texts ; uncond texts]."""
        if not texts:
            raise ValueError("condition: no texts")
        dev, dtype = self.pos_start.device, self.pos_start.dtype
        t = max(x.shape[0] for x in texts)
        for x in texts:
            c = self.config
            if x.dim() != 2 or x.shape[1] != c.text_channels or not 1 <= x.shape[0] <= c.text_maxlen:
                raise ValueError(f"text: expected [1..{self.config.text_maxlen}, {self.config.text_channels}], "
                                 f"got {tuple(x.shape)}")
        padded = torch.zeros(len(texts), t, self.config.text_channels, device=dev, dtype=dtype)
        mask = torch.zeros(len(texts), t, dtype=torch.bool, device=dev)
        for i, x in enumerate(texts):
            padded[i, : x.shape[0]] = x.to(device=dev, dtype=dtype)
            mask[i, : x.shape[0]] = True
        normed = self.text_norm(padded)
        pooled = self.text_proj_for_sos(normed, mask)
        gss = self.shared_ada_lin(pooled).view(-1, 1, 6, self.config.width)
        memory = self.text_proj_for_ca(normed)
        ks, vs = zip(*(b.ca.kv(memory) for b in self.block_list))
        return InfinityCondition(pooled, gss, list(ks), list(vs), mask)

    def cfg_condition(self, texts: Sequence[torch.Tensor],
                      negatives: Sequence[torch.Tensor | None] | None = None) -> InfinityCondition:
        """[cond ; uncond] rows: each request's text, then its negative text or the learned
        unconditional text cut to the prompt's length."""
        negatives = negatives or [None] * len(texts)
        uncond = [self.uncond_text(t.shape[0]) if n is None else n for t, n in zip(texts, negatives)]
        return self.condition(list(texts) + uncond)

    # ----- pieces shared by teacher forcing, the reference loop and a paged runner ---------
    def rope(self, schedule: Schedule, full: tuple[int, int]) -> list[torch.Tensor]:
        """Per-scale RoPE angles (see ``rope_angles``) on the model's device."""
        return [a.to(self.pos_start.device) for a in rope_angles(self.config, schedule, full)]

    def embed_scale(self, si: int, cond: InfinityCondition, next_input: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings entering the blocks at scale ``si``: the pooled text + pos_start at
        scale 0, else ``word_embed`` of the next-scale input [N, h w, token_bits]; plus the
        scale's level embedding (added once, before the first block)."""
        if si == 0:
            x = cond.pooled.unsqueeze(1) + self.pos_start
        else:
            x = self.word_embed(next_input.to(self.word_embed.weight.dtype))
        return x + self.lvl_embed.weight[si]

    def run_blocks(self, x: torch.Tensor, cond: InfinityCondition, attend: AttendFn,
                   angles: torch.Tensor) -> torch.Tensor:
        """All blocks over ``x`` (the tokens of ``angles`` [L, head_dim/2], or [1, T, ...] packed)."""
        for block in self.block_list:
            x = block(x, cond, angles, attend)
        return x

    def logits(self, x: torch.Tensor, cond: InfinityCondition) -> torch.Tensor:
        """[N, L, 2 token_bits]: logits of bit j are entries 2j (bit 0) and 2j + 1 (bit 1)."""
        return self.head(self.head_nm(x, cond)).float()

    # ----- teacher forcing -------------------------------------------------------------------
    def forward(self, cond: InfinityCondition, next_inputs: torch.Tensor, schedule: Schedule,
                full: tuple[int, int] | None = None) -> torch.Tensor:
        """Teacher-forced forward over ``schedule`` with the block-causal mask.

        ``next_inputs`` [N, L - 1, token_bits] (the tokenizer's ``teacher_forcing_input``);
        ``full``: the RoPE reference grid (default the schedule's last grid). Returns logits
        [N, L, 2 token_bits]; the tokens of scale k are predicted at scale k's positions."""
        schedule = [tuple(hw) for hw in schedule]
        full = full or schedule[-1]
        lens = [h * w for h, w in schedule]
        n = sum(lens)
        if next_inputs.shape[1] != n - 1:
            raise ValueError(f"next_inputs: expected {n - 1} positions, got {next_inputs.shape[1]}")
        sos = cond.pooled.unsqueeze(1) + self.pos_start
        x = torch.cat((sos, self.word_embed(next_inputs.to(self.word_embed.weight.dtype))), dim=1)
        lvl = torch.cat([torch.full((m,), si, dtype=torch.long) for si, m in enumerate(lens)]).to(x.device)
        x = x + self.lvl_embed(lvl)
        angles = torch.cat(self.rope(schedule, full))
        visible = lvl.view(n, 1) >= lvl.view(1, n)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=SelfAttention.softmax_scale)

        return self.logits(self.run_blocks(x, cond, attend, angles), cond)
