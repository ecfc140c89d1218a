"""``SchedulerConfig``: the cluster's shape (how many workers, what they run) and its policies."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.config import WorkerConfig

NAMESPACE = "scalekv"  # default Ray namespace of the scheduler and its workers (local clusters get their own)
DEFAULT_NAME = "scalekv-scheduler"


@dataclass
class SchedulerConfig:
    """Knobs of the ``Scheduler`` actor. ``num_workers`` None means one per GPU of the Ray
    cluster, or 1 on a cluster without GPUs."""

    name: str = DEFAULT_NAME
    num_workers: int | None = None
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    use_gpus: bool | None = None  # None: one worker per GPU when the cluster has GPUs
    cpus_per_worker: float | None = None  # Ray CPUs a CPU worker reserves; None: its share of the cluster's
    max_restarts: int = 3  # Ray restarts of a dead worker
    max_attempts: int = 3  # a request whose worker died this many times fails instead of requeueing
    max_inflight_per_worker: int | None = None  # None: the engine's max_running
    poll_wait_s: float = 0.2  # how long one worker poll may wait for results
    worker_start_timeout_s: float = 300.0  # a worker not up after this is reported failed
    namespace: str = NAMESPACE  # Ray namespace of the scheduler and its workers
    # Durable job store (SQLite + results folder, ``store.py``) on the scheduler's node. None: a
    # temporary one removed at shutdown, and the scheduler is not restarted if it dies.
    store_dir: str | None = None
    scheduler_max_restarts: int = -1  # Ray restarts of the scheduler actor (with a store_dir); -1: unlimited
    collected_retention_s: float = 600.0  # results of a fully collected job are deleted after this
    retention_s: float = 7 * 86400.0  # results of a finished job nobody collected are deleted after this

    def __post_init__(self) -> None:
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 1):
            raise ValueError(f"num_workers: must be an integer >= 1, got {self.num_workers!r}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker: must be >= 0, got {self.cpus_per_worker}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts: must be >= -1 (-1: unlimited), got {self.max_restarts}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if self.max_inflight_per_worker is not None and self.max_inflight_per_worker < 1:
            raise ValueError(f"max_inflight_per_worker: must be >= 1, got {self.max_inflight_per_worker}")
        if not 0 < self.poll_wait_s <= 5:
            raise ValueError(f"poll_wait_s: must be in (0, 5], got {self.poll_wait_s}")
        if not self.name:
            raise ValueError("name: must be a non-empty actor name")
        if not self.namespace:
            raise ValueError("namespace: must be a non-empty Ray namespace")
        if self.collected_retention_s < 0 or self.retention_s < 0:
            raise ValueError("collected_retention_s / retention_s: must be >= 0")

    @property
    def durable(self) -> bool:
        """Jobs survive the scheduler: a store directory, and Ray restarts the scheduler."""
        return self.store_dir is not None and self.scheduler_max_restarts != 0
