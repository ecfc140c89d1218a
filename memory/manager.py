"""Scale-aware KV memory manager: page quotas, exact reservation at admission, release.

A VAR request's memory needs are known when it arrives: for every scale and layer, how many
tokens that layer keeps for the later scales (its *quota*, a ``KVPlan``). The manager turns
a plan into the peak number of pages a sequence will ever hold, reserves that at admission
(so a running request can never run out of pages), hands pages out lazily as layers grow,
takes back pages freed by compression, and releases everything on completion or error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: capacity planning (memory.planner) uses the plan math only
    from .pool import KVPool


@dataclass(frozen=True)
class KVPlan:
    """Token capacity per (scale, layer): ``kept[si][layer]`` tokens of history this layer
    keeps after scale ``si`` for the scales that follow. Nothing is kept after the last scale
    (no later scale reads it), so ``kept[-1]`` is all zeros."""

    name: str
    kept: tuple[tuple[int, ...], ...]
    drafters: tuple[tuple[int, ...], ...] = ()  # per scale, the drafter layers (compression plans)

    @property
    def num_scales(self) -> int:
        return len(self.kept)

    @property
    def num_layers(self) -> int:
        return len(self.kept[0])

    def history(self, si: int, layer: int) -> int:
        """Tokens a layer reads as history at scale ``si``."""
        return 0 if si == 0 else self.kept[si - 1][layer]

    def pages_at(self, si: int, block_size: int) -> list[int]:
        """Pages each layer needs while scale ``si`` runs: a layer holds its old history until
        its new kept set is written, so the step needs max(before, after) per layer."""
        return [
            -(-max(self.history(si, layer), self.kept[si][layer]) // block_size)
            for layer in range(self.num_layers)
        ]

    def peak_pages(self, block_size: int) -> int:
        """Pages a sequence needs at its worst scale (the reservation)."""
        return max(sum(self.pages_at(si, block_size)) for si in range(self.num_scales))

    def peak_tokens(self) -> int:
        return max(sum(max(self.history(si, la), self.kept[si][la]) for la in range(self.num_layers))
                   for si in range(self.num_scales))


def full_plan(scale_lengths: Sequence[int], depth: int) -> KVPlan:
    """The ``full`` policy: every layer keeps every token of every finished scale.
    ``scale_lengths``: tokens per scale (side squared), ``depth``: number of layers."""
    cum, kept = 0, []
    for si, n in enumerate(scale_lengths):
        cum += n
        kept.append(tuple([cum if si < len(scale_lengths) - 1 else 0] * depth))
    return KVPlan(name="full", kept=tuple(kept))


def request_pages(plan: KVPlan, block_size: int, num_sequences: int = 2) -> int:
    """Pages reserved at admission for a request of ``num_sequences`` sequences (the two CFG
    branches) that follow ``plan``: each sequence's peak, no sharing between them. The one
    formula for admission (``MemoryManager``), routing and capacity planning."""
    return plan.peak_pages(block_size) * num_sequences


class RequestTooLargeError(ValueError):
    """The request needs more pages than the whole pool has: it could never be admitted."""


@dataclass
class _Reservation:
    seqs: tuple[int, ...]
    pages: int  # reserved at admission (peak of all its sequences)
    held: int = 0  # pages currently allocated to its sequences
    peak_held: int = 0
    plan: KVPlan | None = None
    tokens_peak: int = 0  # peak of tokens stored (for waste accounting)
    step_peak: int = 0  # most pages held at once during the current step
    peak_bytes: int = 0  # most KV bytes at once over all steps: pages held + that step's scratch


class MemoryManager:
    """Owns the page table and the accounting between the pool and the requests."""

    def __init__(self, pool: KVPool) -> None:
        from .page_table import PageTable

        self.pool = pool
        self.block_size = pool.block_size
        self.table = PageTable(pool.block_size)
        self._res: dict[str, _Reservation] = {}
        self._seq_owner: dict[int, str] = {}
        self._outstanding = 0  # reserved but not yet allocated pages, over all requests

    # ----- admission -----------------------------------------------------------------
    def request_pages(self, plan: KVPlan, num_sequences: int = 2) -> int:
        return request_pages(plan, self.block_size, num_sequences)

    def available_pages(self) -> int:
        """Free pages not promised to an admitted request."""
        return self.pool.num_free - self._outstanding

    def check_fits_pool(self, plan: KVPlan, num_sequences: int = 2) -> None:
        need = self.request_pages(plan, num_sequences)
        if need > self.pool.num_pages:
            raise RequestTooLargeError(
                f"request needs {need} KV pages ({need * self.pool.page_bytes / 2**20:.1f} MiB, policy "
                f"{plan.name!r}) but the whole pool has {self.pool.num_pages} pages "
                f"({self.pool.total_bytes / 2**20:.1f} MiB): raise kv_pool_bytes or lower kv_budget"
            )

    def try_reserve(self, request_id: str, seqs: tuple[int, ...], plan: KVPlan) -> bool:
        """Reserve the request's peak pages if they are available now; False means wait."""
        if request_id in self._res:
            raise ValueError(f"request {request_id!r} already holds a reservation")
        self.check_fits_pool(plan, len(seqs))
        need = self.request_pages(plan, len(seqs))
        if need > self.available_pages():
            return False
        self._res[request_id] = _Reservation(seqs=seqs, pages=need, plan=plan)
        for s in seqs:
            self._seq_owner[s] = request_id
        self._outstanding += need
        return True

    # ----- growth and shrinking during a step ---------------------------------------------
    def ensure_capacity(self, seq: int, layer: int, num_tokens: int) -> list[int]:
        """Make (seq, layer) able to hold ``num_tokens``; allocates from the reservation."""
        have = self.table.num_pages(seq, layer)
        need = -(-num_tokens // self.block_size)
        if need > have:
            res = self._res[self._seq_owner[seq]]
            extra = need - have
            if res.held + extra > res.pages:
                raise RuntimeError(
                    f"sequence {seq} layer {layer} exceeds its reservation ({res.held + extra} > {res.pages} "
                    "pages): the KV plan and the runner disagree"
                )
            self.table.append_pages(seq, layer, self.pool.allocate(extra))
            res.held += extra
            res.peak_held = max(res.peak_held, res.held)
            res.step_peak = max(res.step_peak, res.held)
            self._outstanding -= extra
        return self.table.pages(seq, layer)

    def set_tokens(self, seq: int, layer: int, num_tokens: int) -> None:
        """Record the tokens a layer now keeps and give surplus pages back to the pool."""
        self.table.set_num_tokens(seq, layer, num_tokens)
        keep = -(-num_tokens // self.block_size)
        dropped = self.table.trim_pages(seq, layer, keep)
        if dropped:
            self.pool.free(dropped)
            res = self._res[self._seq_owner[seq]]
            res.held -= len(dropped)
            self._outstanding += len(dropped)  # still reserved: a later scale may need them again

    def begin_step(self, request_id: str) -> None:
        """A step of this request starts: its within-step page peak starts at what it holds."""
        res = self._res[request_id]
        res.step_peak = res.held

    def end_step(self, request_id: str, scratch_bytes: int) -> None:
        """The step ended: the request's true KV peak is the most, over steps, of the pages it
        held at once during a step plus that step's scratch (the current scale's K/V of one
        layer, which live outside the pool). A pool peak at one scale and the scratch of another
        never coincide, so they are not added."""
        res = self._res[request_id]
        res.peak_bytes = max(res.peak_bytes, res.step_peak * self.pool.page_bytes + scratch_bytes)

    def note_tokens_peak(self, request_id: str) -> None:
        res = self._res[request_id]
        stored = sum(self.table.num_tokens(s, la) for s in res.seqs for la in self.table.layers(s))
        res.tokens_peak = max(res.tokens_peak, stored)

    # ----- release --------------------------------------------------------------------
    def release(self, request_id: str) -> dict:
        """Free every page of the request and drop its reservation. Idempotent. Returns its
        accounting (reserved/peak pages) for stats."""
        res = self._res.pop(request_id, None)
        if res is None:
            return {}
        for s in res.seqs:
            pages = self.table.remove_sequence(s)
            if pages:
                self.pool.free(pages)
            self._seq_owner.pop(s, None)
        self._outstanding -= res.pages - res.held
        return {
            "pages_reserved": res.pages,
            "pages_peak": res.peak_held,
            "tokens_peak": res.tokens_peak,
            "kv_peak_bytes": max(res.peak_bytes, res.peak_held * self.pool.page_bytes),
            "pool_peak_bytes": res.peak_held * self.pool.page_bytes,
        }

    def release_all(self) -> None:
        for rid in list(self._res):
            self.release(rid)

    # ----- reporting ------------------------------------------------------------------
    @property
    def num_reserved_requests(self) -> int:
        return len(self._res)

    def stats(self) -> dict:
        pool = self.pool.stats()
        held = sum(r.held for r in self._res.values())
        reserved = sum(r.pages for r in self._res.values())
        return {
            **pool,
            "reserved_pages": reserved,
            "held_pages": held,
            "outstanding_pages": self._outstanding,
            "available_pages": self.available_pages(),
            "requests_reserved": len(self._res),
        }
