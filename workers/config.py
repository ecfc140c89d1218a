"""``WorkerConfig``: what one worker actor needs to build its model and engine.

A dataclass (not loose kwargs) because the same object is pickled into every worker actor and
re-read by Ray when it restarts a dead worker: the restarted worker must rebuild exactly the
same model and pool, or requeued requests would not reproduce their images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class WorkerConfig:
    """Model, engine knobs and compute share of one worker."""

    model: str = "var-tiny"  # a name from engine.models.registry.MODELS
    checkpoint: str | None = None  # transformer weights (file or directory); None: shipped weights
    tokenizer: str | None = None
    random_init: bool = False  # allow random weights (tests, shape benchmarks)
    seed: int = 0  # init seed for random weights: every worker must hold the same model
    engine: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None  # torch intra-op threads (CPU share); None: leave torch's default
    device: str = "auto"  # auto: cuda when the actor was given a GPU, else cpu

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads: must be an integer >= 1, got {self.threads!r}")
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine: expected an EngineConfig, got {type(self.engine).__name__}")
