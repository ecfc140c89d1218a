"""Scheduler-side Prometheus metrics (queue depth, requeues) through ``ray.util.metrics``.

Guarded like the workers' (``workers/telemetry.py``): telemetry never breaks serving.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class SchedulerMetrics:
    def __init__(self, name: str) -> None:
        self._tags = {"scheduler": name}
        self._requeued = 0
        self.enabled = False
        try:
            import ray
            from ray.util.metrics import Counter, Gauge

            if ray.is_initialized():
                self.queue = Gauge("scalekv_scheduler_queue_depth", "Requests queued in the scheduler.",
                                   tag_keys=("scheduler",))
                self.requeues = Counter("scalekv_num_requests_requeued_total",
                                        "Requests requeued because their worker died.", tag_keys=("scheduler",))
                self.enabled = True
        except Exception as e:  # pragma: no cover - metrics agent missing
            log.info("scheduler metrics disabled: %s", e)

    def update(self, queue_depth: int, requeued: int) -> None:
        if not self.enabled:
            return
        try:
            self.queue.set(queue_depth, tags=self._tags)
            if requeued > self._requeued:
                self.requeues.inc(requeued - self._requeued, tags=self._tags)
                self._requeued = requeued
        except Exception as e:  # pragma: no cover
            log.debug("scheduler metrics update failed: %s", e)
