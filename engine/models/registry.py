"""Named model configurations and checkpoint loading.

``var-d16`` ... ``var-d30`` have the official shapes (load ``var_d*.pth`` and
``vae_ch160v4096z32.pth`` strictly). ``var-tiny`` is trained in this repository and shipped as
safetensors under ``engine/models/weights/var-tiny``. ``var-micro`` exists for fast unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelSpec, VARConfig, VQVAEConfig
from .var import VAR
from .vqvae import VQVAE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRANSFORMER_FILE = "transformer.safetensors"
TOKENIZER_FILE = "tokenizer.safetensors"

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


@dataclass
class LoadedModel:
    spec: ModelSpec
    var: VAR
    vae: VQVAE
    source: str  # where the weights came from ("random-init" or paths)


def default_checkpoint_dir(spec: ModelSpec) -> Path | None:
    if spec.default_checkpoint_dir is None:
        return None
    d = WEIGHTS_DIR / spec.default_checkpoint_dir
    return d if (d / TRANSFORMER_FILE).exists() and (d / TOKENIZER_FILE).exists() else None


def shipped_profile_path(model_name: str) -> Path:
    """Where a model's shipped scale profile lives (beside its weights)."""
    from memory.profile import PROFILE_FILE

    return WEIGHTS_DIR / model_name / PROFILE_FILE


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` (ours) or ``.pth``/``.pt`` (official)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_into(module: torch.nn.Module, path: str | Path) -> None:
    """Strict load, casting stored dtypes (we ship fp16) to the module's dtypes."""
    sd = load_state_dict_file(path)
    own = module.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {type(module).__name__}: {e}") from None


def save_safetensors(module: torch.nn.Module, path: str | Path, half: bool = True) -> None:
    """Save a state dict as safetensors, floats as fp16 when ``half`` (small shipped files)."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point() and torch.isfinite(v).all():
            v = v.half()
        sd[k] = v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def build_model(
    name: str,
    checkpoint: str | Path | None = None,
    tokenizer: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build a named model and load its weights.

    ``checkpoint`` is a transformer file or a directory holding ``transformer.safetensors`` and
    ``tokenizer.safetensors``; without it the model's shipped weights are used. A model with no
    weights refuses to build unless ``random_init`` is set: never silently random.
    """
    spec = get_spec(name)
    if checkpoint is not None and Path(checkpoint).is_dir():
        tokenizer = tokenizer or Path(checkpoint) / TOKENIZER_FILE
        checkpoint = Path(checkpoint) / TRANSFORMER_FILE
    if checkpoint is None and not random_init:
        d = default_checkpoint_dir(spec)
        if d is None:
            raise ValueError(
                f"model {name!r} has no shipped weights: pass --checkpoint PATH "
                "(and --tokenizer PATH) or --random-init for random weights"
            )
        checkpoint, tokenizer = d / TRANSFORMER_FILE, d / TOKENIZER_FILE
    if checkpoint is not None and tokenizer is None and not random_init:
        raise ValueError("a transformer --checkpoint needs its --tokenizer checkpoint too")
    torch.manual_seed(seed)
    var, vae = VAR(spec.var), VQVAE(spec.vae)
    if checkpoint is not None:
        load_into(var, checkpoint)
    if tokenizer is not None:
        load_into(vae, tokenizer)
    source = "random-init" if checkpoint is None and tokenizer is None else f"{checkpoint} + {tokenizer}"
    var.eval().to(device)
    vae.eval().to(device)
    for p in list(var.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    return LoadedModel(spec=spec, var=var, vae=vae, source=source)
