"""Building named models and loading their weights (the model table is in ``catalog.py``).

``var-tiny`` and ``var-deep`` are trained in this repository and shipped as safetensors under
``engine/models/weights/<model>``; official VAR checkpoints (``var_d*.pth`` with
``vae_ch160v4096z32.pth``) load strictly into the ``var-d*`` shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .catalog import DEFAULT_MODEL, MODELS, SHAPES_CLASS_NAMES, get_spec  # noqa: F401  (re-exported)
from .config import ModelSpec
from .var import VAR
from .vqvae import VQVAE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRANSFORMER_FILE = "transformer.safetensors"
TOKENIZER_FILE = "tokenizer.safetensors"

@dataclass
class LoadedModel:
    spec: ModelSpec
    var: VAR
    vae: VQVAE
    source: str  # where the weights came from ("random-init" or paths)


def shipped_weights(spec: ModelSpec) -> tuple[Path, Path] | None:
    """(transformer, tokenizer) files a model ships with, or None when it ships none."""
    if spec.default_checkpoint_dir is None:
        return None
    transformer = WEIGHTS_DIR / spec.default_checkpoint_dir / TRANSFORMER_FILE
    tokenizer = WEIGHTS_DIR / (spec.tokenizer_dir or spec.default_checkpoint_dir) / TOKENIZER_FILE
    return (transformer, tokenizer) if transformer.exists() and tokenizer.exists() else None


def default_checkpoint_dir(spec: ModelSpec) -> Path | None:
    """The folder of a model's shipped transformer, or None when it ships none."""
    files = shipped_weights(spec)
    return None if files is None else files[0].parent


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
        files = shipped_weights(spec)
        if files is None:
            raise ValueError(
                f"model {name!r} has no shipped weights: pass --checkpoint PATH "
                "(and --tokenizer PATH) or --random-init for random weights"
            )
        checkpoint, tokenizer = files
    if checkpoint is not None and tokenizer is None and not random_init:
        raise ValueError("a transformer --checkpoint needs its --tokenizer checkpoint too")
    torch.manual_seed(seed)
    var, vae = VAR(spec.var), VQVAE(spec.vae)
    if checkpoint is not None:
        load_into(var, checkpoint)
    if tokenizer is not None:
        load_into(vae, tokenizer)
    source = "random-init" if checkpoint is None and tokenizer is None else \
        f"{_portable(checkpoint)} + {_portable(tokenizer)}"
    var.eval().to(device)
    vae.eval().to(device)
    for p in list(var.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    return LoadedModel(spec=spec, var=var, vae=vae, source=source)


def _portable(path: str | Path | None) -> str:
    """A weights path as reports should show it: relative to the checkout for shipped weights
    (reports and profiles are committed; an absolute path would name one machine)."""
    if path is None:
        return "None"
    root = WEIGHTS_DIR.parent.parent.parent
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)
