"""Routing: which worker gets the next request. Pure functions, unit-tested without Ray.

Every worker has ``num_pages`` pages; the scheduler counts the pages it has promised to each
(the page demand of every request it sent and has not seen finish, computed with the engine's
own ``MemoryManager.request_pages``). A request goes to a worker where that demand fits in the
pages still free after those reservations, so a routed request is admitted by the worker's
engine without waiting for pages.

Among the workers where it fits, the one with the most free pages wins (ties: fewer requests in
flight, then name). Preferring the tightest fit, as bin packing would, piles requests onto one
worker while another idles: VAR compute grows with the pages a request holds, so free pages are
also the best proxy for idle compute. ``max_inflight`` per worker keeps the surplus in the
scheduler's queue, where it can still go to whichever worker frees up first, and where a worker
crash cannot take it down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class WorkerView:
    """What routing needs to know about one live worker."""

    name: str
    num_pages: int
    reserved_pages: int = 0
    in_flight: int = 0
    max_inflight: int = 64

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.reserved_pages

    def fits(self, demand: int) -> bool:
        return demand <= self.free_pages and self.in_flight < self.max_inflight


def pick_worker(workers: Sequence[WorkerView], demand: int) -> WorkerView | None:
    """The worker where ``demand`` pages fit with the most free pages left, or None."""
    fitting = [w for w in workers if w.fits(demand)]
    if not fitting:
        return None
    return min(fitting, key=lambda w: (-w.free_pages, w.in_flight, w.name))


def fits_any_when_empty(workers: Sequence[WorkerView], demand: int) -> bool:
    """Whether some worker could ever take the request (its whole pool is large enough)."""
    return any(demand <= w.num_pages for w in workers)


def route(items: Sequence, workers: Sequence[WorkerView], demand_of: Callable[[object], int]) -> list[tuple]:
    """Assign queued items, in order, to workers; returns ``[(item, worker_view), ...]`` and
    updates the views' reservations. Stops at the first item that fits nowhere now (FIFO, like
    the engine's admission: the head of the queue waits for pages rather than starve)."""
    out = []
    for item in items:
        demand = demand_of(item)
        w = pick_worker(workers, demand)
        if w is None:
            break
        w.reserved_pages += demand
        w.in_flight += 1
        out.append((item, w))
    return out
