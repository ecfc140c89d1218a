"""Shared plumbing for the training recipes: resumable checkpoints, logging, schedules."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch


def to_model_input(images_uint8, image_size: int) -> torch.Tensor:
    """Rendered uint8 images -> [-1, 1] tensors at the model's resolution (area resampling, so
    micro test configs can train on the same 64x64 data)."""
    from training.shapes import to_tensor

    x = to_tensor(images_uint8)
    if x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="area")
    return x


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


class RunDir:
    """A training run folder: ``ckpt.pt`` (resumable state, written atomically) and ``log.jsonl``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.path / "ckpt.pt"
        self.log_file = self.path / "log.jsonl"
        self.started = time.time()
        self.resumed_config: dict | None = None  # the config a resumed checkpoint was written with

    def load(self) -> dict | None:
        if not self.ckpt.exists():
            return None
        return torch.load(self.ckpt, map_location="cpu", weights_only=False)

    def save(self, state: dict) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)

    def resume(self, model: torch.nn.Module, optim: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, float]:
        """Restore model, optimizer and data-order generator from ``ckpt.pt`` if present;
        returns (step, elapsed seconds) to continue from."""
        state = self.load()
        if state is None:
            return 0, 0.0
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        gen.set_state(state["gen"])
        self.resumed_config = state.get("config")
        return state["step"], state.get("elapsed", 0.0)

    def checkpoint(self, model: torch.nn.Module, optim: torch.optim.Optimizer, gen: torch.Generator, step: int,
                   elapsed: float, config: dict) -> None:
        self.save({"model": model.state_dict(), "optim": optim.state_dict(), "gen": gen.get_state(),
                   "step": step, "elapsed": elapsed, "config": config})

    def log(self, record: dict) -> None:
        with self.log_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
