"""Building named models and loading their weights (the model table is in ``catalog.py``).

``var-tiny`` and ``var-deep`` are trained in this repository and shipped as safetensors under
``engine/models/weights/<model>``; official VAR checkpoints (``var_d*.pth`` with
``vae_ch160v4096z32.pth``) load strictly into the ``var-d*`` shapes.

Infinity models (``build_infinity``) load the released files: ``infinity_2b_reg.pth`` (one
file) or the sharded 8B directory, through ``load_infinity_state_dict`` (its documented quirks,
otherwise strict), and the BSQ tokenizer through ``load_bsq_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .bsq import BSQTokenizer, load_bsq_state_dict
from .catalog import (  # noqa: F401
    DEFAULT_MODEL,
    INFINITY_MODELS,
    MODELS,
    SHAPES_CLASS_NAMES,
    get_infinity_spec,
    get_spec,
)
from .config import InfinitySpec, ModelSpec
from .infinity import Infinity
from .infinity_loading import load_infinity_state_dict
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
) -> LoadedModel | LoadedInfinity:
    """Build a named model of either family and load its weights (an Infinity name returns
    ``build_infinity``'s ``LoadedInfinity``; ``engine.api.make_engine`` serves either).

    ``checkpoint`` is a transformer file or a directory holding ``transformer.safetensors`` and
    ``tokenizer.safetensors``; without it the model's shipped weights are used. A model with no
    weights refuses to build unless ``random_init`` is set: never silently random.
    """
    if name in INFINITY_MODELS:  # one entry point for both families: callers need not branch
        return build_infinity(name, checkpoint, tokenizer, random_init=random_init, device=device, seed=seed)
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
    source = _inference_ready(var, vae, checkpoint, tokenizer, device)
    return LoadedModel(spec=spec, var=var, vae=vae, source=source)


def _inference_ready(transformer: torch.nn.Module, tokenizer_module: torch.nn.Module, checkpoint, tokenizer,
                     device) -> str:
    """Eval mode on ``device``, frozen; returns where the weights came from (for reports)."""
    for m in (transformer, tokenizer_module):
        m.eval().to(device)
        for p in m.parameters():
            p.requires_grad_(False)
    if checkpoint is None and tokenizer is None:
        return "random-init"
    return f"{_portable(checkpoint)} + {_portable(tokenizer)}"


def _portable(path: str | Path | None) -> str:
    """A weights path as reports should show it: relative to the checkout for shipped weights
    (reports and profiles are committed; an absolute path would name one machine)."""
    if path is None:
        return "None"
    root = WEIGHTS_DIR.parent.parent.parent
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


# ----- Infinity -------------------------------------------------------------------------------
@dataclass
class LoadedInfinity:
    spec: InfinitySpec
    model: Infinity
    tokenizer: BSQTokenizer
    source: str

    @property
    def softmax_scales(self) -> list[float]:
        return self.model.softmax_scales


def load_checkpoint_tree(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from one file, or merged from every ``.safetensors`` / ``.bin`` / ``.pth``
    shard of a directory (the sharded 8B release); a key found in two shards is an error."""
    path = Path(path)
    if not path.is_dir():
        return load_state_dict_file(path)
    shards = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if not shards:
        raise FileNotFoundError(f"no checkpoint shards in {path}")
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_state_dict_file(shard)
        dup = next((k for k in part if k in out), None)
        if dup is not None:
            raise ValueError(f"{shard}: key {dup!r} is also in an earlier shard")
        out.update(part)
    return out


def build_infinity(
    name: str,
    checkpoint: str | Path | None = None,
    tokenizer: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedInfinity:
    """Build a named Infinity model; ``checkpoint`` (a file or a directory of shards) and
    ``tokenizer`` are the released files. Without them the model refuses to build unless
    ``random_init`` is set."""
    spec = get_infinity_spec(name)
    if not random_init and (checkpoint is None or tokenizer is None):
        raise ValueError(f"model {name!r} has no shipped weights: pass the transformer checkpoint and the "
                         "tokenizer checkpoint, or random_init for random weights")
    torch.manual_seed(seed)
    model, tok = Infinity(spec.model), BSQTokenizer(spec.tokenizer)
    if checkpoint is not None:
        load_infinity_state_dict(model, load_checkpoint_tree(checkpoint))
    if tokenizer is not None:
        load_bsq_state_dict(tok, load_checkpoint_tree(tokenizer))
    source = _inference_ready(model, tok, checkpoint, tokenizer, device)
    return LoadedInfinity(spec=spec, model=model, tokenizer=tok, source=source)
