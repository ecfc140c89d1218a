"""Worker telemetry: process and device memory, and Prometheus metrics through Ray.

Metric names follow vLLM's (``vllm:num_requests_running`` -> ``scalekv_num_requests_running``)
so existing dashboards and alerts carry over with a prefix change. Ray exports them from every
actor to its metrics agent; they are recorded only inside a Ray worker, and every call is
guarded, because telemetry must never be the reason a worker fails a request.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def process_rss_bytes() -> int:
    """Resident set size of this process (psutil); 0 if unavailable."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing or a sandbox forbids /proc
        return 0


_nvml_ok: bool | None = None


def _nvml_handle(device_index: int):
    """NVML handle of this process's CUDA device. NVML counts physical GPUs while torch counts
    visible ones, so the visible index is mapped through CUDA_VISIBLE_DEVICES (which Ray sets)."""
    import pynvml

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ident = visible[device_index] if device_index < len(visible) else str(device_index)
    if ident.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(ident))
    return pynvml.nvmlDeviceGetHandleByUUID(ident)


def device_memory(device: str) -> dict | None:
    """GPU memory of a CUDA device (NVML: used/total on the whole GPU; torch: this process's
    allocations). None on CPU or when NVML is unavailable."""
    global _nvml_ok
    if not device.startswith("cuda"):
        return None
    out: dict = {}
    try:
        import torch

        idx = torch.device(device).index or 0
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(idx))
        out["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(idx))
    except Exception:
        idx = 0
    if _nvml_ok is not False:
        try:
            import pynvml

            if _nvml_ok is None:
                pynvml.nvmlInit()
                _nvml_ok = True
            info = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(idx))
            out.update(used_bytes=int(info.used), total_bytes=int(info.total), free_bytes=int(info.free))
        except Exception as e:  # no driver, no NVML in a container ...
            _nvml_ok = False
            log.info("NVML unavailable, device memory from torch only: %s", e)
    return out or None


class WorkerMetrics:
    """Gauges, a counter and histograms tagged with the worker's name (no-ops outside Ray)."""

    def __init__(self, worker: str, enabled: bool = True) -> None:
        self._tags = {"worker": worker}
        self._preemptions_seen = 0
        self.enabled = False
        if not enabled:
            return
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            keys = ("worker",)
            self.running = Gauge("scalekv_num_requests_running", "Requests admitted and stepping.", tag_keys=keys)
            self.waiting = Gauge("scalekv_num_requests_waiting", "Requests queued in the worker.", tag_keys=keys)
            self.kv_usage = Gauge("scalekv_kv_cache_usage_perc",
                                  "Fraction of KV pool pages allocated (1 means 100 percent).", tag_keys=keys)
            self.kv_reserved = Gauge("scalekv_kv_cache_reserved_perc",
                                     "Fraction of KV pool pages reserved by admitted requests.", tag_keys=keys)
            self.rss = Gauge("scalekv_process_rss_bytes", "Resident memory of the worker process.", tag_keys=keys)
            self.device_mem = Gauge("scalekv_device_memory_used_bytes", "GPU memory in use (NVML).", tag_keys=keys)
            self.preemptions = Counter("scalekv_num_preemptions_total", "Preempted requests.", tag_keys=keys)
            self.e2e = Histogram("scalekv_e2e_request_latency_seconds", "Arrival at the worker to finished image.",
                                 boundaries=list(LATENCY_BUCKETS), tag_keys=keys)
            self.ttfs = Histogram("scalekv_time_to_first_scale_seconds", "Arrival to the first scale generated.",
                                  boundaries=list(LATENCY_BUCKETS), tag_keys=keys)
            self.enabled = True
        except Exception as e:  # pragma: no cover - metrics agent missing
            log.info("ray metrics disabled: %s", e)

    def update(self, stats: dict) -> None:
        if not self.enabled:
            return
        try:
            eng = stats.get("engine", {})
            self.running.set(eng.get("num_requests_running", 0), tags=self._tags)
            self.waiting.set(eng.get("num_requests_waiting", 0) + stats.get("inbox", 0), tags=self._tags)
            num_pages = max(1, eng.get("num_pages", 1))
            self.kv_usage.set(eng.get("used", 0) / num_pages, tags=self._tags)
            self.kv_reserved.set(eng.get("reserved_pages", 0) / num_pages, tags=self._tags)
            self.rss.set(stats.get("rss_bytes", 0), tags=self._tags)
            dev = stats.get("device_memory") or {}
            if "used_bytes" in dev:
                self.device_mem.set(dev["used_bytes"], tags=self._tags)
            pre = eng.get("num_preemptions", 0)
            if pre > self._preemptions_seen:
                self.preemptions.inc(pre - self._preemptions_seen, tags=self._tags)
                self._preemptions_seen = pre
        except Exception as e:  # pragma: no cover
            log.debug("metrics update failed: %s", e)

    def observe(self, e2e_seconds: float, first_scale_seconds: float | None) -> None:
        if not self.enabled:
            return
        try:
            self.e2e.observe(e2e_seconds, tags=self._tags)
            if first_scale_seconds is not None:
                self.ttfs.observe(first_scale_seconds, tags=self._tags)
        except Exception as e:  # pragma: no cover
            log.debug("metrics observe failed: %s", e)
