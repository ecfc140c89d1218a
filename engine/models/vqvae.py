"""Multi-scale VQ tokenizer (state-dict compatible with VAR's ``vae_ch160v4096z32.pth``).

Encoding quantises the latent map residually over the scale schedule: at each scale the residual
is area-downsampled, snapped to the shared codebook, bicubic-upsampled back, refined by a
partially shared phi conv and subtracted. The same accumulation produces the transformer's
"next-scale input" both in teacher forcing and in generation (``NextScaleInput``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VQVAEConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU runs in place on the GroupNorm outputs: fresh temporaries that nothing else reads
        # (GroupNorm's backward needs its input, not its output), never on x, the residual input.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv (as in the official layout)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1), v.transpose(1, 2).unsqueeze(1)
        )
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in the taming design


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        g, mult, n = cfg.norm_groups, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level in range(n):
            block_out = cfg.ch * mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if level == n - 1 and cfg.using_sa:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != n - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        if cfg.using_mid_sa:
            self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_1(h)
        if hasattr(self.mid, "attn_1"):
            h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # fresh temporary


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        g, mult, n = cfg.norm_groups, cfg.ch_mult, len(cfg.ch_mult)
        block_in = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        if cfg.using_mid_sa:
            self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        stages: list[nn.Module] = []
        for level in reversed(range(n)):  # built from the lowest resolution up
            block_out = cfg.ch * mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if level == n - 1 and cfg.using_sa:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by resolution level, like the official checkpoint
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_1(self.conv_in(z))
        if hasattr(self.mid, "attn_1"):
            h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # fresh temporary


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h): the learned refinement of each upsampled scale."""

    def __init__(self, channels: int, resi_ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


def phi_index_per_scale(num_phis: int, num_scales: int) -> list[int]:
    """Which of ``num_phis`` phi convs each of ``num_scales`` scales uses: official VAR's rule.

    The phis sit at evenly spaced ticks on [0, 1], ``linspace(1/(3K), 1 - 1/(3K), K)`` for
    K == 4 phis and ``linspace(1/(2K), 1 - 1/(2K), K)`` for any other K; scale k (of S) takes
    the phi whose tick is nearest k / (S - 1) (0 for a single scale), the first one on an exact
    tie. Computed like upstream: float64 numpy ticks, a Python-float ratio, ``np.argmin``.
    """
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    ratios = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - r))) for r in ratios]


class PhiSet(nn.Module):
    """``n`` phi convs shared by all scales (``n == 0``: one per scale), mapped to scales by
    ``phi_index_per_scale``: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] for 4 phis and 10 scales."""

    def __init__(self, channels: int, resi_ratio: float, n: int, num_scales: int) -> None:
        super().__init__()
        n = num_scales if n == 0 else n
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(n))
        # numpy, not torch, so the module also builds on the meta device. For n == num_scales
        # (one phi per scale) the rule is the identity map; n == 1 always gives phi 0.
        self.scale_to_phi = phi_index_per_scale(n, num_scales)

    def forward(self, h: torch.Tensor, scale_index: int) -> torch.Tensor:
        return self.qresi_ls[self.scale_to_phi[scale_index]](h)


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over the scale schedule with one shared codebook."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_nums = tuple(cfg.patch_nums)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiSet(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi, len(self.patch_nums))
        # Per-scale EMA of codebook hits: the codebook-usage report during training.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> code indices [B, h*w] (row-major) by squared L2 distance."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        codes = self.embedding.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return dist.argmin(dim=1).view(b, h * w)

    def lookup(self, idx: torch.Tensor, side: int) -> torch.Tensor:
        """indices [B, side*side] -> code map [B, C, side, side]."""
        b = idx.shape[0]
        return self.embedding(idx).transpose(1, 2).reshape(b, -1, side, side).float()

    def upsampled_residual(self, idx: torch.Tensor, scale_index: int) -> torch.Tensor:
        """The contribution of one scale's tokens to f_hat: bicubic-upsample (not at the last
        scale) and refine with that scale's phi."""
        side, full = self.patch_nums[scale_index], self.patch_nums[-1]
        h = self.lookup(idx, side)
        if scale_index != self.num_scales - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.quant_resi(h, scale_index)

    def encode_to_indices(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Latent map [B, C, H, W] -> per-scale token maps, each [B, p_k^2]."""
        f = f.float()
        residual = f.clone()
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = residual if si == self.num_scales - 1 else F.interpolate(residual, size=(pn, pn), mode="area")
            idx = self.nearest_code(z)
            out.append(idx)
            residual = residual - self.upsampled_residual(idx, si)
        return out

    def indices_to_fhat(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        f_hat = None
        for si, idx in enumerate(idx_per_scale):
            h = self.upsampled_residual(idx, si)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training forward: returns (f_hat with straight-through gradient, vq loss, indices).

        Loss per scale: beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2, averaged over scales.
        """
        f = f.float()
        f_detached = f.detach()
        residual = f_detached.clone()
        f_hat = torch.zeros_like(f)
        loss = f.new_zeros(())
        indices = []
        for si, pn in enumerate(self.patch_nums):
            z = residual if si == self.num_scales - 1 else F.interpolate(residual, size=(pn, pn), mode="area")
            idx = self.nearest_code(z)
            indices.append(idx)
            h = self.upsampled_residual(idx, si)
            f_hat = f_hat + h
            residual = residual - h.detach()
            loss = loss + self.config.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
            if self.training:
                with torch.no_grad():
                    hits = torch.bincount(idx.flatten(), minlength=self.config.vocab_size).float()
                    hits = hits / hits.sum()
                    self.ema_vocab_hit_SV[si].mul_(0.99).add_(hits, alpha=0.01)
        loss = loss / self.num_scales
        # Value f_hat; the decoder's gradient flows straight through to the encoder (via f) and
        # also to the codebook and phi convs (via f_hat).
        return f + (f_hat - f_detached), loss, indices

    # ----- the transformer's input -------------------------------------------------------
    def advance(self, f_hat: torch.Tensor, si: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``si``'s tokens to f_hat; return (new f_hat, next scale's input or None
        after the last scale). The next input is f_hat area-downsampled to the next side,
        flattened row-major to [B, p_{k+1}^2, C]."""
        f_hat = f_hat + self.upsampled_residual(idx, si)
        if si == self.num_scales - 1:
            return f_hat, None
        nxt = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)

    def teacher_forcing_input(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """Ground-truth tokens of all scales -> the inputs of scales 2..K, [B, L-1, C].

        Built with the same step as generation (``NextScaleInput.add``), so the two agree.
        """
        state = NextScaleInput(self, idx_per_scale[0].shape[0], idx_per_scale[0].device)
        return torch.cat([state.add(si, idx) for si, idx in enumerate(idx_per_scale[:-1])], dim=1)


class NextScaleInput:
    """Accumulated feature map f_hat of a batch of images, grown one scale at a time.

    ``add(si, tokens)`` adds scale ``si``'s tokens and returns the next scale's input (f_hat
    area-downsampled to the next side, flattened row-major to [B, p_{k+1}^2, C]).
    """

    def __init__(self, quantizer: MultiScaleQuantizer, batch: int, device: torch.device | str) -> None:
        full = quantizer.patch_nums[-1]
        self.q = quantizer
        self.f_hat = torch.zeros(batch, quantizer.config.z_channels, full, full, device=device)

    def add(self, si: int, idx: torch.Tensor) -> torch.Tensor | None:
        self.f_hat, nxt = self.q.advance(self.f_hat, si, idx)
        return nxt


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def img_to_indices(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1], [B, 3, H, W] -> per-scale token maps."""
        return self.quantize.encode_to_indices(self.encode_latent(img))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated feature map -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def indices_to_img(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.indices_to_fhat(idx_per_scale))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training forward: (reconstruction in [-1, 1] before clamp, vq loss, indices)."""
        f_hat, vq_loss, idx = self.quantize(self.encode_latent(img))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, idx


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1]."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


