"""Infinity's bitwise tokenizer: a FLUX-VAE-style conv autoencoder with multi-scale binary
spherical quantisation (BSQ), state-dict compatible with the released
``infinity_vae_d32_reg.pth`` (stride 16, d = 32) and ``infinity_vae_d56_f8_14_patchify.pth``
(stride 8, d = 14, the transformer reading 2x2 patches: 56 bits a token).

There is no codebook: a latent vector (d channels) is L2-normalised and every channel snapped to
+-1/sqrt(d) by its sign, so a token is d bits (bit 1 = positive). Encoding quantises the latent
residually over the scale schedule: at each scale the residual is area-downsampled, quantised,
bilinearly upsampled back to the full grid and subtracted; the upsampled codes accumulate into
``f_hat``, which the decoder turns into pixels. The same accumulation yields the transformer's
next-scale input (``NextScaleState``) in teacher forcing and in generation.

Scales are given in the transformer's token grid; with ``patchify`` the latent grid of a scale
is twice as large, and a token's 4 d bits are its 2x2 latent cells in ``pixel_unshuffle`` order
(channel c * 4 + 2 * dy + dx).

Key layout: the module tree wraps every conv as ``<name>.conv`` and every GroupNorm as
``<name>.norm`` (``encoder.conv_in.conv.weight``, ``encoder.down.0.block.0.norm1.norm.weight``);
``load_bsq_state_dict`` also accepts the unwrapped names (``encoder.conv_in.weight``), as the
released loader does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BSQConfig

Schedule = tuple[tuple[int, int], ...] | list[tuple[int, int]]


class Conv(nn.Module):
    """A 2-D conv under the name ``conv`` (the released key layout)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm (eps 1e-6, affine) under the name ``norm``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = Norm(cin, groups)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout, groups)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial attention with separate 1x1 q/k/v convs (off in the releases)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = Norm(ch, groups)
        self.q, self.k, self.v = Conv(ch, ch, 1), Conv(ch, ch, 1), Conv(ch, ch, 1)
        self.proj_out = Conv(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        out = F.scaled_dot_product_attention(heads(self.q(n)), heads(self.k(n)), heads(self.v(n)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, attn: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups) if attn else None
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Levels of ``num_res_blocks`` ResNet blocks, a stride-2 conv after every level but the
    last, a middle block, then GroupNorm + SiLU + conv to ``codebook_dim`` channels."""

    def __init__(self, cfg: BSQConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.ch, cfg.ch_mult, cfg.norm_groups
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_in = ch * ((1,) + tuple(mult))[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m, g))
                block_in = ch * m
            if i < len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, g, cfg.mid_attn)
        self.norm_out = Norm(block_in, g)
        self.conv_out = Conv(block_in, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Conv from the latent, a middle block, then levels (indexed by resolution, level 0 the
    finest) of ``num_res_blocks + 1`` ResNet blocks with a nearest x2 upsample after every
    level but the finest, then GroupNorm + SiLU + conv to RGB."""

    def __init__(self, cfg: BSQConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.ch, cfg.ch_mult, cfg.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, cfg.mid_attn)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], g))
                block_in = ch * mult[i]
            if i >= 1:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Norm(block_in, g)
        self.conv_out = Conv(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BinarySphericalQuantizer(nn.Module):
    """Sign quantisation on the unit sphere. ``mask`` (2^(d-1) .. 1, the bit weights of an
    integer label) is kept as the released state dict has it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = dim**-0.5
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, d, h, w] -> (codes +-1/sqrt(d) [B, d, h, w], bits {0, 1} [B, h, w, d]).

        The vector is L2-normalised first (which never flips a sign); exactly 0 maps to -."""
        z = F.normalize(z.float(), dim=1)
        positive = z > 0
        codes = torch.where(positive, self.scale, -self.scale).to(z.dtype)
        return codes, positive.permute(0, 2, 3, 1).to(torch.uint8)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """bits {0, 1} [B, h, w, d] -> codes [B, d, h, w]."""
        return (bits.float() * 2 - 1).mul_(self.scale).permute(0, 3, 1, 2).contiguous()


class _QuantizerHolder(nn.Module):
    """Keeps the released key ``quantizer.lfq.mask``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lfq = BinarySphericalQuantizer(dim)


class BSQTokenizer(nn.Module):
    def __init__(self, cfg: BSQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = _QuantizerHolder(cfg.codebook_dim)

    @property
    def bsq(self) -> BinarySphericalQuantizer:
        return self.quantizer.lfq

    # ----- grids -----------------------------------------------------------------------------
    def latent_schedule(self, schedule: Schedule) -> list[tuple[int, int]]:
        """Token grids -> latent grids (x2 with patchify)."""
        f = self.config.token_factor
        return [(h * f, w * f) for h, w in schedule]

    def tokens_from_latent_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Latent-grid bits [B, H, W, d] -> tokens [B, (H/f)(W/f), f^2 d] (row-major)."""
        if self.config.patchify:
            bits = F.pixel_unshuffle(bits.permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1).to(bits.dtype)
        return bits.flatten(1, 2)

    def latent_bits_from_tokens(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens [B, h w, f^2 d] of a token grid ``hw`` -> latent-grid bits [B, f h, f w, d]."""
        b = tokens.shape[0]
        bits = tokens.reshape(b, hw[0], hw[1], -1)
        if self.config.patchify:
            bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1).to(tokens.dtype)
        return bits

    def features_to_tokens(self, f: torch.Tensor) -> torch.Tensor:
        """A latent-grid feature map [B, d, H, W] -> next-scale tokens [B, hw, f^2 d]."""
        if self.config.patchify:
            f = F.pixel_unshuffle(f, 2)
        return f.flatten(2).transpose(1, 2)

    # ----- encode / decode -------------------------------------------------------------------
    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> raw latent [B, d, H/stride, W/stride]."""
        return self.encoder(img)

    def quantize_multiscale(self, z: torch.Tensor, schedule: Schedule) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residual multi-scale BSQ of a latent ``z`` [B, d, H, W] whose grid is the schedule's
        last (latent) grid. Returns each scale's tokens [B, h w, token_bits] (uint8 bits) and
        the accumulated codes f_hat [B, d, H, W]."""
        grids = self.latent_schedule(schedule)
        full = tuple(z.shape[-2:])
        if grids[-1] != full:
            raise ValueError(f"the schedule ends at latent grid {grids[-1]}, the latent is {full}")
        residual = z.float()
        f_hat = torch.zeros_like(residual)
        tokens = []
        for hw in grids:
            r = residual if hw == full else F.interpolate(residual, size=hw, mode="area")
            codes, bits = self.bsq.quantize(r)
            if hw != full:
                codes = F.interpolate(codes, size=full, mode="bilinear")
            residual = residual - codes
            f_hat = f_hat + codes
            tokens.append(self.tokens_from_latent_bits(bits))
        return tokens, f_hat

    def encode(self, img: torch.Tensor, schedule: Schedule) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (tokens of every scale, f_hat)."""
        return self.quantize_multiscale(self.encode_latent(img), schedule)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated codes [B, d, H, W] -> images in [-1, 1]."""
        return self.decoder(f_hat).clamp(-1, 1)

    def tokens_to_fhat(self, tokens: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        state = NextScaleState(self, schedule, tokens[0].shape[0], tokens[0].device)
        for si, t in enumerate(tokens):
            state.add(si, t)
        return state.f_hat

    def teacher_forcing_input(self, tokens: list[torch.Tensor], schedule: Schedule,
                              mode: str | None = None) -> torch.Tensor:
        """Ground-truth tokens of all scales -> the transformer's inputs of scales 2..K,
        [B, L - 1, token_bits], built with the same step as generation (``NextScaleState``)."""
        state = NextScaleState(self, schedule, tokens[0].shape[0], tokens[0].device, mode=mode)
        return torch.cat([state.add(si, t) for si, t in enumerate(tokens[:-1])], dim=1)

    def forward(self, img: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, f_hat = self.encode(img, schedule)
        return self.decode(f_hat), tokens


class NextScaleState:
    """Accumulated codes (``f_hat``, latent grid of the last scale) of a batch, grown one scale
    at a time. ``add(si, tokens)`` adds scale ``si``'s sampled bits and returns the next scale's
    transformer input [B, h w, token_bits] (f_hat resized to the next latent grid with
    ``mode``, default the tokenizer's ``next_input_mode``, then patchified), or None after
    the last scale."""

    def __init__(self, tokenizer: BSQTokenizer, schedule: Schedule, batch: int, device: torch.device | str,
                 mode: str | None = None) -> None:
        self.tok = tokenizer
        self.schedule = [tuple(hw) for hw in schedule]
        self.grids = tokenizer.latent_schedule(self.schedule)
        self.mode = mode or tokenizer.config.next_input_mode
        h, w = self.grids[-1]
        self.f_hat = torch.zeros(batch, tokenizer.config.codebook_dim, h, w, device=device)

    def add(self, si: int, tokens: torch.Tensor) -> torch.Tensor | None:
        bits = self.tok.latent_bits_from_tokens(tokens, self.schedule[si])
        codes = self.tok.bsq.bits_to_codes(bits).to(self.f_hat.device)
        full = self.grids[-1]
        if self.grids[si] != full:
            codes = F.interpolate(codes, size=full, mode="bilinear")
        self.f_hat = self.f_hat + codes
        if si == len(self.schedule) - 1:
            return None
        nxt = F.interpolate(self.f_hat, size=self.grids[si + 1], mode=self.mode)
        return self.tok.features_to_tokens(nxt)


def _unwrapped_to_wrapped(key: str, own: set[str]) -> str | None:
    """Map an unwrapped conv/norm key (``x.conv_in.weight``) to its wrapped name
    (``x.conv_in.conv.weight``) when that is one of ``own``."""
    for leaf in ("weight", "bias"):
        if key.endswith("." + leaf):
            stem = key[: -len(leaf) - 1]
            for wrap in ("conv", "norm"):
                cand = f"{stem}.{wrap}.{leaf}"
                if cand in own:
                    return cand
    return None


def load_bsq_state_dict(model: BSQTokenizer, sd: dict[str, torch.Tensor]) -> None:
    """Load a tokenizer state dict strictly, after two documented normalisations:

    - unwrapped conv / GroupNorm names (``encoder.conv_in.weight``) become the wrapped ones
      (``encoder.conv_in.conv.weight``);
    - ``quantize.*`` (the released module registers its quantiser under two names, so its
      state dict repeats the bit mask) is dropped, and ``quantizer.lfq.mask``, a constant,
      is checked instead of loaded.

    Everything else must match exactly: no missing, unexpected or mis-shaped key.
    """
    own_sd = model.state_dict()
    own = set(own_sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("quantize.") or k == "quantizer.lfq.mask":
            if k.endswith("lfq.mask") and not torch.equal(v.to(own_sd["quantizer.lfq.mask"].dtype),
                                                          own_sd["quantizer.lfq.mask"]):
                raise ValueError(f"{k}: the bit mask does not match codebook_dim {model.config.codebook_dim}")
            continue
        key = k if k in own else (_unwrapped_to_wrapped(k, own) or k)
        if key in out:
            raise ValueError(f"checkpoint has both {key!r} and an unwrapped alias of it")
        out[key] = v.to(own_sd[key].dtype) if key in own_sd else v
    out["quantizer.lfq.mask"] = own_sd["quantizer.lfq.mask"]
    try:
        model.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise ValueError(f"tokenizer checkpoint does not match BSQTokenizer({model.config}): {e}") from None
