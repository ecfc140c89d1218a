"""Loading released Infinity checkpoints into ``Infinity``: the official loader's non-strict
quirks made explicit (the ``block_chunks.{c}.module.{j}`` layout of the 2B/8B releases, ``cfg_uncond``
trimmed or padded to the model's text length, derived mask buffers dropped); everything else strict.
"""

from __future__ import annotations

import re

import torch

from .config import InfinityConfig
from .infinity import Infinity

# Buffers some checkpoints carry that this model derives (masks, level ids); the released
# loader drops them, and so does ``load_infinity_state_dict``.
DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


_BLOCK_KEY = re.compile(r"^(?:blocks\.(\d+)|block_chunks\.(\d+)\.module\.(\d+))\.(.*)$")


def _block_layout(sd: dict[str, torch.Tensor], cfg: InfinityConfig) -> dict[str, torch.Tensor]:
    """Rename block keys between ``blocks.{i}`` and ``block_chunks.{c}.module.{j}`` (the
    released chunking) to the layout of ``cfg``; a chunked key is read with the chunk size
    implied by the checkpoint's largest ``j``."""
    chunked = [m for m in (_BLOCK_KEY.match(k) for k in sd) if m and m.group(2) is not None]
    per_chunk = 1 + max((int(m.group(3)) for m in chunked), default=0)
    out = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.match(k)
        if m is None:
            out[k] = v
            continue
        i = int(m.group(1)) if m.group(1) is not None else int(m.group(2)) * per_chunk + int(m.group(3))
        if cfg.block_chunks == 1:
            out[f"blocks.{i}.{m.group(4)}"] = v
        else:
            n = cfg.blocks_per_chunk
            out[f"block_chunks.{i // n}.module.{i % n}.{m.group(4)}"] = v
    return out


def load_infinity_state_dict(model: Infinity, sd: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a transformer state dict with the released loader's quirks made explicit:

    - ``cfg_uncond`` is cut to the model's ``text_maxlen`` rows, or padded with the model's own
      rows when the checkpoint has fewer;
    - the derived buffers ``DERIVED_BUFFERS`` (masks, level ids) are dropped;
    - block keys are accepted in either layout (``blocks.{i}`` / ``block_chunks.{c}.module.{j}``).

    Everything else is strict: a missing, unexpected or mis-shaped key raises ValueError.
    Returns what was adjusted ({"dropped": [...], "cfg_uncond": ["trimmed 600 -> 512"]}).
    """
    sd = dict(sd)
    report: dict[str, list[str]] = {"dropped": [], "cfg_uncond": []}
    for name in DERIVED_BUFFERS:
        if sd.pop(name, None) is not None:
            report["dropped"].append(name)
    if "cfg_uncond" in sd:
        old, own = sd["cfg_uncond"], model.cfg_uncond.detach()
        if old.dim() != 2 or old.shape[1] != own.shape[1]:
            raise ValueError(f"cfg_uncond: expected [*, {own.shape[1]}], got {tuple(old.shape)}")
        if old.shape[0] > own.shape[0]:
            sd["cfg_uncond"] = old[: own.shape[0]]
            report["cfg_uncond"].append(f"trimmed {old.shape[0]} -> {own.shape[0]}")
        elif old.shape[0] < own.shape[0]:
            sd["cfg_uncond"] = torch.cat((old.to(own.dtype), own[old.shape[0]:].cpu().to(own.dtype)))
            report["cfg_uncond"].append(f"padded {old.shape[0]} -> {own.shape[0]} with the model's rows")
    sd = _block_layout(sd, model.config)
    own_sd = model.state_dict()
    sd = {k: v.to(own_sd[k].dtype) if k in own_sd and v.is_floating_point() else v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"transformer checkpoint does not match Infinity({model.config.depth}x{model.config.width}): "
                         f"{e}") from None
    return report
