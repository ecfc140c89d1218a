"""Typed configurations for the VAR transformer and its multi-scale VQ tokenizer.

The defaults reproduce the official VAR-256 release (``var_d16.pth`` ... ``var_d30.pth`` with
``vae_ch160v4096z32.pth``), so that changing a field is always a deliberate departure from the
checkpoint layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

VAR_256_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class VQVAEConfig:
    """Conv encoder/decoder + residual multi-scale quantiser with one shared codebook."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of a code vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True  # self-attention blocks at the lowest resolution
    using_mid_sa: bool = True  # self-attention in the middle block
    norm_groups: int = 32
    in_channels: int = 3
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # blend of the phi conv
    share_quant_resi: int = 4  # number of partially shared phi convs (0 = one per scale)
    patch_nums: tuple[int, ...] = VAR_256_PATCH_NUMS
    image_size: int = 256

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def __post_init__(self) -> None:
        latent = self.image_size // self.downsample
        if self.patch_nums[-1] != latent:
            raise ValueError(
                f"patch_nums must end at the latent side {latent} (image_size {self.image_size} / "
                f"stride {self.downsample}), got {self.patch_nums}"
            )
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")


@dataclass(frozen=True)
class VARConfig:
    """Class-conditional next-scale transformer (AdaLN blocks, L2-normalised attention)."""

    depth: int = 16
    width: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = VAR_256_PATCH_NUMS
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def scale_lengths(self) -> list[int]:
        return [p * p for p in self.patch_nums]

    def scale_starts(self) -> list[int]:
        starts, acc = [], 0
        for p in self.patch_nums:
            starts.append(acc)
            acc += p * p
        return starts

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.patch_nums[0] != 1:
            raise ValueError("the first scale must be 1x1 (the SOS position)")


@dataclass(frozen=True)
class ModelSpec:
    """A named model: transformer + tokenizer configs and where its weights live."""

    name: str
    var: VARConfig
    vae: VQVAEConfig
    default_checkpoint_dir: str | None = None  # relative to engine/models/weights
    tokenizer_dir: str | None = None  # where its tokenizer ships, when shared (default: default_checkpoint_dir)
    notes: str = ""
    default_cfg: float = 1.5
    default_top_k: int = 900
    default_top_p: float = 0.96
    class_names: tuple[str, ...] | None = None  # names accepted for class_label (index order)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.class_names is not None and len(self.class_names) != self.var.num_classes:
            raise ValueError(f"class_names: {len(self.class_names)} names for {self.var.num_classes} classes")

    def class_name(self, label: int) -> str | None:
        return None if self.class_names is None else self.class_names[label]

    def to_dict(self) -> dict:
        return asdict(self)


# ----- Infinity (text-to-image, bitwise tokens) -------------------------------------------------

# Token-grid (h, w) per scale for each aspect ratio h/w at the full 13-scale ("1M") schedule of
# the released Infinity models (stride-16 latents, so 64x64 tokens = 1024x1024 px at 1:1). Each
# ratio r < 1 uses the transposed list of 1/r. Shorter resolutions are prefixes of these lists.
INFINITY_RATIO_SCALES: tuple[tuple[float, tuple[tuple[int, int], ...]], ...] = (
    (1.000, ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
             (48, 48), (64, 64))),
    (1.250, ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
             (55, 44), (70, 56))),
    (1.333, ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
             (60, 45), (72, 54))),
    (1.500, ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
             (63, 42), (78, 52))),
    (1.750, ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
             (70, 40), (84, 48))),
    (2.000, ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
             (74, 37), (90, 45))),
    (2.500, ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
             (80, 32), (100, 40))),
    (3.000, ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
             (90, 30), (111, 37))),
)

# Named resolutions -> number of scales (prefix of the full schedule). "1M" is 1024x1024 at 1:1.
INFINITY_RESOLUTIONS: tuple[tuple[str, int], ...] = (("0.06M", 7), ("0.25M", 10), ("0.60M", 12), ("1M", 13))


def _with_inverse_ratios(table: tuple) -> tuple:
    out = list(table)
    for ratio, hws in table:
        if ratio != 1.0:
            out.append((int(1000 / ratio) / 1000, tuple((w, h) for h, w in hws)))
    return tuple(sorted(out))


@dataclass(frozen=True)
class BSQConfig:
    """FLUX-VAE-style conv autoencoder + multi-scale binary spherical quantiser (no codebook).

    The latent has ``codebook_dim`` channels; each latent vector is L2-normalised and every
    channel snapped to +-1/sqrt(d). ``patchify``: the transformer sees 2x2 latent patches, so a
    token carries 4 d bits and the transformer's grid is half the latent grid (the 8B release).
    """

    codebook_dim: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    norm_groups: int = 32
    mid_attn: bool = False  # the released tokenizers are built without the middle attention block
    patchify: bool = False
    # How the accumulated codes are resized to the next scale's grid to form the transformer's
    # input: the released inference resizes with the up-mode ("bilinear"); the quantiser's own
    # training-time inputs use "area".
    next_input_mode: str = "bilinear"

    @property
    def stride(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_factor(self) -> int:
        """Latent cells per token side (2 with patchify)."""
        return 2 if self.patchify else 1

    @property
    def token_bits(self) -> int:
        """Bits per transformer token."""
        return self.codebook_dim * self.token_factor**2

    @property
    def token_stride(self) -> int:
        """Pixels per token side."""
        return self.stride * self.token_factor

    def __post_init__(self) -> None:
        if self.next_input_mode not in ("bilinear", "area"):
            raise ValueError(f"next_input_mode must be 'bilinear' or 'area', got {self.next_input_mode!r}")


@dataclass(frozen=True)
class InfinityConfig:
    """Text-conditioned next-scale transformer with bitwise logits (Infinity).

    Every block: shared AdaLN (one ``shared_ada_lin`` + a per-block ``ada_gss`` offset),
    cos-attention with RoPE-2D, an ungated cross-attention to the projected text, and an FFN.
    """

    depth: int = 32
    width: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    token_bits: int = 32  # bits per token: the tokenizer's codebook_dim (x4 with patchify)
    text_channels: int = 2048  # Flan-T5-XL
    text_maxlen: int = 512  # rows of cfg_uncond
    num_lvl: int = 15  # rows of lvl_embed
    block_chunks: int = 8  # the released checkpoints group blocks as block_chunks.{c}.module.{j}
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    cond_drop_rate: float = 0.1
    ratio_scales: tuple = INFINITY_RATIO_SCALES
    resolutions: tuple[tuple[str, int], ...] = INFINITY_RESOLUTIONS
    default_resolution: str = "1M"
    # Text heads of the attentive pool are pool_head_dim wide in the text space; None takes the
    # released rule (128, or 64 for widths above 4096).
    text_pool_head_dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio / 256) * 256

    @property
    def vocab_size(self) -> int:
        """Logits per token: two per bit."""
        return 2 * self.token_bits

    @property
    def pool_head_dim(self) -> int:
        """Text channels per head of the attentive pool (text_proj_for_sos): the pool has
        text_channels / pool_head_dim heads, each width / pool_heads wide on the query side."""
        if self.text_pool_head_dim is not None:
            return self.text_pool_head_dim
        return 64 if self.width > 4096 else 128

    @property
    def pool_heads(self) -> int:
        return self.text_channels // self.pool_head_dim

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    def ratio_table(self) -> tuple[tuple[float, tuple[tuple[int, int], ...]], ...]:
        return _with_inverse_ratios(self.ratio_scales)

    def nearest_ratio(self, h_div_w: float) -> float:
        """The aspect-ratio template nearest to ``h_div_w`` (height / width)."""
        if not h_div_w > 0:
            raise ValueError(f"h_div_w must be > 0, got {h_div_w}")
        return min((r for r, _ in self.ratio_table()), key=lambda r: abs(r - h_div_w))

    def full_schedule(self, h_div_w: float = 1.0) -> tuple[tuple[int, int], ...]:
        ratio = self.nearest_ratio(h_div_w)
        return dict(self.ratio_table())[ratio]

    def num_scales_for(self, resolution: str | int | None) -> int:
        if resolution is None:
            resolution = self.default_resolution
        if isinstance(resolution, int):
            n = resolution
        else:
            names = dict(self.resolutions)
            if resolution not in names:
                raise ValueError(f"unknown resolution {resolution!r}; known: {', '.join(names)}")
            n = names[resolution]
        full = len(self.ratio_scales[0][1])
        if not 1 <= n <= min(full, self.num_lvl):
            raise ValueError(f"resolution: {n} scales, must be in [1, {min(full, self.num_lvl)}]")
        return n

    def schedule(self, h_div_w: float = 1.0, resolution: str | int | None = None) -> tuple[tuple[int, int], ...]:
        """Token grids (h, w) of every scale for an aspect ratio and a named resolution (or a
        number of scales)."""
        return self.full_schedule(h_div_w)[: self.num_scales_for(resolution)]

    def scale_lengths(self, h_div_w: float = 1.0, resolution: str | int | None = None) -> list[int]:
        """Tokens of every scale (what one sequence adds to each layer's cache per scale)."""
        return [h * w for h, w in self.schedule(h_div_w, resolution)]

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (RoPE-2D)")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.text_channels % self.pool_head_dim:
            raise ValueError(f"text_channels {self.text_channels} not divisible by {self.pool_head_dim}")
        if self.width % self.pool_heads:
            raise ValueError(f"width {self.width} not divisible by the pool's {self.pool_heads} heads")
        if self.default_resolution not in dict(self.resolutions):
            raise ValueError(f"default_resolution {self.default_resolution!r} is not in resolutions")


@dataclass(frozen=True)
class InfinitySpec:
    """A named Infinity model: transformer + BSQ tokenizer configs and sampling defaults."""

    name: str
    model: InfinityConfig
    tokenizer: BSQConfig
    notes: str = ""
    default_cfg: float = 3.0
    default_tau: float = 1.0
    default_top_k: int = 0
    default_top_p: float = 0.97
    text_encoder: str = "google/flan-t5-xl"  # a local directory of this model encodes prompts
    checkpoint_files: tuple[str, ...] = ()  # the released file names, for documentation

    def __post_init__(self) -> None:
        if self.model.token_bits != self.tokenizer.token_bits:
            raise ValueError(f"{self.name}: transformer token_bits {self.model.token_bits} != tokenizer's "
                             f"{self.tokenizer.token_bits}")

    def image_size(self, h_div_w: float = 1.0, resolution: str | int | None = None) -> tuple[int, int]:
        """(height, width) in pixels of an image at this aspect ratio and resolution."""
        h, w = self.model.schedule(h_div_w, resolution)[-1]
        return h * self.tokenizer.token_stride, w * self.tokenizer.token_stride

    def to_dict(self) -> dict:
        return asdict(self)
