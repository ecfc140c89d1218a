"""The named models: transformer + tokenizer configs, sampling defaults, class names.

``var-d16`` ... ``var-d30`` have the official shapes (load ``var_d*.pth`` and
``vae_ch160v4096z32.pth`` strictly). ``var-tiny`` and ``var-deep`` are trained in this
repository on the synthetic shapes dataset and shipped. ``var-micro`` exists for fast unit
tests. Plain data, no torch: the command line lists these without loading a model.
"""

from __future__ import annotations

from .config import ModelSpec, VARConfig, VQVAEConfig

_OFFICIAL_VAE = VQVAEConfig()


def _official(depth: int) -> ModelSpec:
    var = VARConfig(depth=depth, width=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
    return ModelSpec(
        name=f"var-d{depth}",
        var=var,
        vae=_OFFICIAL_VAE,
        notes=f"Official VAR-d{depth} shapes (ImageNet 256px, 1000 classes); load var_d{depth}.pth.",
        default_cfg=1.5,
        default_top_k=900,
        default_top_p=0.96,
    )


TINY_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

_TINY_VAE = VQVAEConfig(
    vocab_size=512,
    z_channels=16,
    ch=32,
    ch_mult=(1, 2, 4),
    num_res_blocks=1,
    using_sa=False,
    using_mid_sa=False,
    norm_groups=16,
    patch_nums=TINY_PATCH_NUMS,
    image_size=64,
)

# The synthetic shapes dataset's classes (shape x texture), in label order.
SHAPES_CLASS_NAMES = tuple(f"{s}-{t}" for s in ("disk", "square", "triangle", "ring", "cross")
                           for t in ("solid", "striped"))

MODELS: dict[str, ModelSpec] = {
    **{f"var-d{d}": _official(d) for d in (16, 20, 24, 30)},
    "var-tiny": ModelSpec(
        name="var-tiny",
        var=VARConfig(
            depth=8,
            width=256,
            num_heads=4,
            num_classes=10,
            vocab_size=512,
            z_channels=16,
            patch_nums=TINY_PATCH_NUMS,
            drop_path_rate=0.0,
        ),
        vae=_TINY_VAE,
        default_checkpoint_dir="var-tiny",
        class_names=SHAPES_CLASS_NAMES,
        notes="Trained here on the synthetic shapes dataset: 64x64 RGB, 10 classes, 680 tokens.",
        # Chosen by class accuracy on seeds 10000+ (disjoint from the eval seeds 0..99), 150 images each:
        # cfg 2/top-k 100/top-p .95: 34%; cfg 4/100/.95: 27%; cfg 4/20/.9: 34%; cfg 6/20/.9: 41%.
        default_cfg=6.0,
        default_top_k=20,
        default_top_p=0.9,
    ),
    "var-deep": ModelSpec(
        name="var-deep",
        # Deep and narrow: 32 layers x 128 wide (head dim 64) cost about the linear FLOPs of var-tiny
        # (12 L d^2 is the same) and twice its attention, but give ScaleKV the depth it needs: at a
        # 10% budget one drafter that keeps its whole history needs ~24 layers.
        var=VARConfig(
            depth=32,
            width=128,
            num_heads=2,
            num_classes=10,
            vocab_size=512,
            z_channels=16,
            patch_nums=TINY_PATCH_NUMS,
            drop_path_rate=0.0,
        ),
        vae=_TINY_VAE,
        default_checkpoint_dir="var-deep",
        tokenizer_dir="var-tiny",  # the same tokenizer, shipped once
        class_names=SHAPES_CLASS_NAMES,
        notes="Trained here on the synthetic shapes dataset with var-tiny's tokenizer; 32 layers for ScaleKV.",
        default_cfg=6.0,
        default_top_k=20,
        default_top_p=0.9,
    ),
    "var-micro": ModelSpec(
        name="var-micro",
        var=VARConfig(
            depth=2,
            width=64,
            num_heads=2,
            num_classes=10,
            vocab_size=32,
            z_channels=8,
            patch_nums=(1, 2, 4, 8),
        ),
        vae=VQVAEConfig(
            vocab_size=32,
            z_channels=8,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            using_sa=True,
            using_mid_sa=True,
            norm_groups=8,
            patch_nums=(1, 2, 4, 8),
            image_size=16,
        ),
        notes="Micro config for unit tests (random weights).",
        default_cfg=1.5,
        default_top_k=0,
        default_top_p=0.0,
    ),
}

DEFAULT_MODEL = "var-tiny"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


