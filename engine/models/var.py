"""Class-conditional next-scale transformer, state-dict compatible with VAR's ``var_d*.pth``.

Every attention layer takes an ``attend`` callable: ``attend(layer, q, k, v) -> out`` with
tensors laid out ``[B, H, L, head_dim]``. Teacher forcing passes none (dense attention with the
block-causal mask); the reference loop passes one that appends to a contiguous cache; the paged
engine passes one that reads and writes the block-paged pool. The model itself never owns a
cache, which keeps one definition of the math for all three.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VARConfig

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused qkv with q/v biases and a zero k bias; L2-normalised q/k with a learned per-head scale."""

    def __init__(self, layer: int, width: int, num_heads: int, l2_norm: bool) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.l2_norm = l2_norm
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)
        if l2_norm:
            self.softmax_scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, C] -> q, k, v each [B, H, L, head_dim]; q/k normalised and q pre-scaled."""
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1) * scale_mul
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, attend: AttendFn | None = None
    ) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x)
        if attend is None:
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        else:
            out = attend(self.layer, q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block with adaptive LayerNorm driven by the class condition."""

    def __init__(self, layer: int, cfg: VARConfig, drop_path: float) -> None:
        super().__init__()
        c = cfg.width
        self.width = c
        self.attn = SelfAttention(layer, c, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        attend: AttendFn | None = None,
    ) -> torch.Tensor:
        return self.forward_modulated(x, self.modulation(cond), attn_bias, attend)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """AdaLN parameters of each condition row: [B, 1, 6, C]."""
        return self.ada_lin(cond).view(-1, 1, 6, self.width)

    def forward_modulated(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        attend: AttendFn | None = None,
    ) -> torch.Tensor:
        """The block with precomputed AdaLN parameters ``mods`` [B, 1 or L, 6, C]: the paged
        runner packs tokens of many sequences into one row and gives each token its own row's
        parameters, so the ada_lin matmul runs once per sequence, not once per token."""
        # Chunk order matters for checkpoint compatibility: gamma1, gamma2, scale1, scale2, shift1, shift2.
        g1, g2, s1, s2, sh1, sh2 = mods.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (s1 + 1) + sh1, attn_bias, attend) * g1)
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (s2 + 1) + sh2) * g2)
        return x

    def forward_segments(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        segments: list[tuple[int, int, int, int]],
        attend: AttendFn,
    ) -> torch.Tensor:
        """Inference form of :meth:`forward_modulated` for packed rows (the paged runner).

        ``x`` [1, T, C] holds the tokens of many sequences back to back; ``segments`` lists
        ``(token_start, seq_start, num_seqs, tokens_per_seq)`` runs of equal-length sequences and
        ``mods`` [N, 6, C] the AdaLN parameters of each sequence. Each run's parameters broadcast
        over its tokens as ``[n, 1, C]`` (no per-token copy of them), and the modulate / gate /
        residual steps run in place on fresh outputs. Every element sees exactly the operations
        of ``forward_modulated`` in the same order, so the result is bit-identical to it (and to
        the reference loop). Eval only (no drop path)."""
        m = [t.unsqueeze(1) for t in mods.unbind(1)]  # 6 x [N, 1, C]
        g1, g2, s1, s2, sh1, sh2 = m
        s1p, s2p = s1 + 1, s2 + 1

        def runs(*ts: torch.Tensor):
            for tok, seq, n, length in segments:
                yield [t[0, tok : tok + n * length].view(n, length, t.shape[-1]) for t in ts], slice(seq, seq + n)

        def modulate(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
            dt = torch.promote_types(torch.promote_types(h.dtype, scale.dtype), shift.dtype)
            out = h if dt == h.dtype else torch.empty(h.shape, dtype=dt, device=h.device)
            for (hv, ov), rows in runs(h, out):
                torch.mul(hv, scale[rows], out=ov).add_(shift[rows])  # (h * scale) + shift, as in the reference
            return out

        def gate_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            dt = torch.promote_types(y.dtype, gate.dtype)
            out = y if dt == y.dtype else torch.empty(y.shape, dtype=dt, device=y.device)
            for (yv, ov), rows in runs(y, out):
                torch.mul(yv, gate[rows], out=ov)
            return x.add_(out) if torch.promote_types(x.dtype, dt) == x.dtype else x + out

        h = modulate(self.ln_wo_grad(x), s1p, sh1)
        x = gate_add(x, self.attn(h, None, attend), g1)
        h = modulate(self.ln_wo_grad(x), s2p, sh2)
        hidden = self.ffn.fc1(h)
        if torch.is_autocast_enabled(hidden.device.type):  # autocast may pick gelu's dtype: keep its op
            act = F.gelu(hidden, approximate="tanh")
        else:
            act = torch.ops.aten.gelu_(hidden, approximate="tanh")
        x = gate_add(x, self.ffn.fc2(act), g2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.config = cfg
        c, n_scales, seq_len = cfg.width, cfg.num_scales, cfg.seq_len
        self.num_classes = cfg.num_classes
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # last row: the null class for CFG
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, seq_len, c))
        self.lvl_embed = nn.Embedding(n_scales, c)
        self.word_embed = nn.Linear(cfg.z_channels, c)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(AdaLNSelfAttn(i, cfg, dpr[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)

        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, seq_len)
        self.register_buffer("lvl_1L", lvl)
        # Block-causal: a token sees its own scale and every coarser one.
        visible = lvl.view(seq_len, 1) >= lvl.view(1, seq_len)
        bias = torch.zeros(seq_len, seq_len).masked_fill_(~visible, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, seq_len, seq_len))
        self.init_weights()

    # ----- initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, gamma_init: float = 1e-3) -> None:
        """VAR's recipe: std sqrt(1/(3C)) for linears/embeddings, small head, depth-scaled
        residual projections, and tiny AdaLN gammas so blocks start near identity."""
        c, depth = self.config.width, self.config.depth
        std = math.sqrt(1 / c / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(0.02)
        self.head.bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            w = block.ada_lin[-1].weight
            w[: 2 * c].mul_(gamma_init)
            w[2 * c :].mul_(0.5)
            block.ada_lin[-1].bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(0.5)
        self.head_nm.ada_lin[-1].bias.zero_()

    # ----- pieces shared by teacher forcing, the reference loop and the paged runner --------
    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels (num_classes = null) -> AdaLN condition [B, C]."""
        return self.class_emb(labels)

    def scale_position(self, si: int) -> torch.Tensor:
        """lvl + pos embedding of scale ``si``'s positions, [1, p^2, C]."""
        start = self.config.scale_starts()[si]
        end = start + self.config.patch_nums[si] ** 2
        return self.lvl_embed.weight[si].view(1, 1, -1) + self.pos_1LC[:, start:end]

    def embed_scale(self, si: int, cond: torch.Tensor, next_input: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings entering the blocks at scale ``si``.

        Scale 0 is the SOS: class embedding + pos_start. Later scales embed the interpolated
        accumulated feature map ``next_input`` [B, p^2, Cvae] with ``word_embed``.
        """
        if si == 0:
            x = cond.unsqueeze(1) + self.pos_start
        else:
            x = self.word_embed(next_input.to(self.word_embed.weight.dtype))
        return x + self.scale_position(si)

    def run_blocks(
        self, x: torch.Tensor, cond: torch.Tensor, attend: AttendFn | None, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond, attn_bias, attend)
        return x

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x, cond)).float()

    # ----- teacher forcing -----------------------------------------------------------------
    def drop_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability
        ``cond_drop_rate`` (drawn from torch's global generator)."""
        if self.config.cond_drop_rate <= 0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, next_inputs: torch.Tensor, num_scales: int | None = None,
                cond_drop: bool = True) -> torch.Tensor:
        """Teacher-forced forward over the first ``num_scales`` scales (default all) with the
        block-causal mask.

        labels [B] (null class allowed), next_inputs [B, L-1, Cvae] (from the tokenizer's
        ``teacher_forcing_input``; only the first L_K - 1 rows are read when ``num_scales`` = K).
        Returns logits [B, L_K, V]; position i predicts token i. Because a scale never sees a
        finer one, the logits of a prefix equal those of the same positions in the full
        forward: training on a prefix is exact, and much cheaper for the coarse scales.
        ``cond_drop`` False: the caller already applied ``drop_condition`` (distillation feeds
        the teacher the same dropped labels).
        """
        k = self.config.num_scales if num_scales is None else num_scales
        if not 1 <= k <= self.config.num_scales:
            raise ValueError(f"num_scales: must be in [1, {self.config.num_scales}], got {num_scales}")
        n = sum(self.config.scale_lengths()[:k])
        b = labels.shape[0]
        if self.training and cond_drop:
            labels = self.drop_condition(labels)
        cond = self.condition(labels)
        sos = cond.unsqueeze(1) + self.pos_start
        x = torch.cat((sos, self.word_embed(next_inputs[:, : n - 1].to(self.word_embed.weight.dtype))), dim=1)
        x = x + self.lvl_embed(self.lvl_1L[:, :n].expand(b, -1)) + self.pos_1LC[:, :n]
        return self.logits(self.run_blocks(x, cond, self._block_causal_attend(k)), cond)

    def _block_causal_attend(self, num_scales: int, unmasked_scales: int = 3) -> AttendFn:
        """Attention under the block-causal mask over the first ``num_scales`` scales, computed in
        pieces: queries of each of the last ``unmasked_scales`` scales see a whole key prefix, so
        they need no mask and skip the masked (invisible) keys entirely; the short rest of the
        sequence uses the dense mask. Same result as one masked SDPA over all tokens, ~20% less
        attention work at var-tiny's shapes."""
        ends = list(itertools.accumulate(self.config.scale_lengths()[:num_scales]))
        split = ends[max(0, len(ends) - 1 - unmasked_scales)]
        bias = self.attn_bias_for_masking[:, :, :split, :split]
        scales = [block.attn.softmax_scale for block in self.blocks]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            s = scales[layer]
            parts = [F.scaled_dot_product_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                                    attn_mask=bias.to(q.dtype), scale=s)]
            start = split
            for end in ends:
                if end > split:
                    parts.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                                                scale=s))
                    start = end
            return torch.cat(parts, dim=2)

        return attend
