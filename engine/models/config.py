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
