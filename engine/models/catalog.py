"""The named models: transformer + tokenizer configs, sampling defaults, class names.

``var-d16`` ... ``var-d30`` have the official shapes (load ``var_d*.pth`` and
``vae_ch160v4096z32.pth`` strictly). ``var-tiny`` and ``var-deep`` are trained in this
repository on the synthetic shapes dataset and shipped. ``var-micro`` exists for fast unit
tests. Plain data, no torch: the command line lists these without loading a model.

The text-to-image Infinity family is a table of its own (``INFINITY_MODELS``): its specs carry
an ``InfinityConfig`` + ``BSQConfig`` instead of the class-conditional ``VARConfig`` +
``VQVAEConfig``. ``infinity-2b`` / ``infinity-8b`` have the released shapes; ``infinity-micro``
runs in seconds on a CPU for tests.
"""

from __future__ import annotations

from .config import BSQConfig, InfinityConfig, InfinitySpec, ModelSpec, VARConfig, VQVAEConfig

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




# ----- Infinity -----------------------------------------------------------------------------

INFINITY_MODELS: dict[str, InfinitySpec] = {
    "infinity-2b": InfinitySpec(
        name="infinity-2b",
        model=InfinityConfig(depth=32, width=2048, num_heads=16, token_bits=32),
        tokenizer=BSQConfig(codebook_dim=32, ch_mult=(1, 2, 4, 4, 4)),
        notes="Released Infinity-2B shapes (1024px, Flan-T5-XL text); load infinity_2b_reg.pth with "
              "infinity_vae_d32_reg.pth (stride 16, d = 32).",
        default_cfg=3.0,
        default_tau=0.5,
        checkpoint_files=("infinity_2b_reg.pth", "infinity_vae_d32_reg.pth"),
    ),
    "infinity-8b": InfinitySpec(
        name="infinity-8b",
        model=InfinityConfig(depth=40, width=3584, num_heads=28, token_bits=56),
        tokenizer=BSQConfig(codebook_dim=14, ch_mult=(1, 2, 4, 4), patchify=True),
        notes="Released Infinity-8B shapes; load the sharded infinity_8b_weights/ with "
              "infinity_vae_d56_f8_14_patchify.pth (stride 8, d = 14, 2x2 patchify: 56 bits a token).",
        default_cfg=3.0,
        default_tau=1.0,
        checkpoint_files=("infinity_8b_weights/", "infinity_vae_d56_f8_14_patchify.pth"),
    ),
    "infinity-micro": InfinitySpec(
        name="infinity-micro",
        model=InfinityConfig(
            depth=2, width=64, num_heads=4, token_bits=8, text_channels=32, text_maxlen=16, block_chunks=2,
            text_pool_head_dim=8,
            ratio_scales=((1.0, ((1, 1), (2, 2), (3, 3), (4, 4))), (2.0, ((1, 1), (2, 1), (4, 2), (6, 3)))),
            resolutions=(("micro", 4), ("tiny", 3)),
            default_resolution="micro",
        ),
        tokenizer=BSQConfig(codebook_dim=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        notes="Micro config for unit tests (random weights, 8 bits a token, 8x8 px at 1:1).",
        default_cfg=3.0,
        default_tau=1.0,
        text_encoder="",
    ),
}


def get_infinity_spec(name: str) -> InfinitySpec:
    try:
        return INFINITY_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown Infinity model {name!r}; known: {', '.join(sorted(INFINITY_MODELS))}") from None
