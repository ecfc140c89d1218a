"""Per (sequence, layer) page lists and token counts.

In a VAR model each layer keeps its own (possibly compressed) history, so the unit of KV
ownership is a (sequence, layer) pair rather than a sequence. The page table is pure host-side
bookkeeping: it never touches the pool tensor, and turns its lists into the padded block-table
tensors that the attention kernels read. A CFG request is simply two sequence ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["PageTable"]


class _Entry:
    """Pages and valid token count of one (sequence, layer)."""

    __slots__ = ("pages", "num_tokens")

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.num_tokens = 0


class PageTable:
    """Page lists and token counts keyed by (sequence id, layer).

    Unknown (sequence, layer) pairs read as empty (no pages, zero tokens): a sequence at its first
    scale has no history, and treating that as the normal empty state keeps callers free of
    special cases. Entries are created on first :meth:`append_pages`.
    """

    def __init__(self, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self._table: dict[int, dict[int, _Entry]] = {}

    # ----------------------------------------------------------------- reads
    def _get(self, seq: int, layer: int) -> _Entry | None:
        layers = self._table.get(seq)
        return None if layers is None else layers.get(layer)

    def pages(self, seq: int, layer: int) -> list[int]:
        """A copy of the page list, so callers cannot corrupt the table by mutating it."""
        entry = self._get(seq, layer)
        return [] if entry is None else list(entry.pages)

    def num_tokens(self, seq: int, layer: int) -> int:
        """Valid tokens stored in the (sequence, layer)'s pages."""
        entry = self._get(seq, layer)
        return 0 if entry is None else entry.num_tokens

    def num_pages(self, seq: int, layer: int | None = None) -> int:
        """Pages held by one layer of ``seq``, or by all its layers when ``layer`` is None."""
        layers = self._table.get(seq, {})
        if layer is not None:
            entry = layers.get(layer)
            return 0 if entry is None else len(entry.pages)
        return sum(len(e.pages) for e in layers.values())

    def capacity(self, seq: int, layer: int) -> int:
        """Tokens the (sequence, layer)'s current pages can hold."""
        entry = self._get(seq, layer)
        return 0 if entry is None else len(entry.pages) * self.block_size

    def sequences(self) -> list[int]:
        """Ids of the sequences that have an entry, in insertion order."""
        return list(self._table)

    def layers(self, seq: int) -> list[int]:
        """Layers that have an entry for ``seq``."""
        return list(self._table.get(seq, {}))

    def __contains__(self, seq: object) -> bool:
        return seq in self._table

    def __len__(self) -> int:
        return len(self._table)

    # ---------------------------------------------------------------- writes
    def append_pages(self, seq: int, layer: int, pages: Iterable[int]) -> None:
        """Give more pages (already allocated from the pool) to a (sequence, layer)."""
        entry = self._table.setdefault(seq, {}).setdefault(layer, _Entry())
        entry.pages.extend(int(p) for p in pages)

    def set_num_tokens(self, seq: int, layer: int, n: int) -> None:
        """Record how many tokens are valid; must fit in the pages held (else the KV was lost)."""
        entry = self._get(seq, layer)
        cap = 0 if entry is None else len(entry.pages) * self.block_size
        if n < 0 or n > cap:
            raise ValueError(
                f"num_tokens={n} for sequence {seq} layer {layer} does not fit its "
                f"{cap // self.block_size} pages of {self.block_size} tokens (capacity {cap})"
            )
        if entry is None:  # n == 0 with no pages: nothing to record
            return
        entry.num_tokens = n

    def trim_pages(self, seq: int, layer: int, keep: int) -> list[int]:
        """Keep the first ``keep`` pages of a (sequence, layer), returning the others to free.

        Used after compression, when a layer's kept tokens fit in fewer pages than it held.
        """
        entry = self._get(seq, layer)
        if entry is None:
            if keep != 0:
                raise ValueError(f"sequence {seq} layer {layer} holds no pages, cannot keep {keep}")
            return []
        if keep < 0 or keep > len(entry.pages):
            raise ValueError(f"keep={keep} outside [0, {len(entry.pages)}] for sequence {seq} layer {layer}")
        if entry.num_tokens > keep * self.block_size:
            raise ValueError(
                f"cannot trim sequence {seq} layer {layer} to {keep} pages: it holds {entry.num_tokens} "
                f"tokens; lower num_tokens first"
            )
        dropped = entry.pages[keep:]
        del entry.pages[keep:]
        return dropped

    def remove_sequence(self, seq: int) -> list[int]:
        """Forget a sequence and return every page it held (all layers), for the pool to free.

        Unknown ids return an empty list, so cleanup on error paths is idempotent.
        """
        layers = self._table.pop(seq, None)
        if layers is None:
            return []
        return [p for entry in layers.values() for p in entry.pages]

    # --------------------------------------------------------------- tensors
    def block_table_tensor(
        self,
        seqs: Sequence[int],
        layer: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.int32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded block table ``[S, max_pages]`` (pad = page 0) and token counts ``[S]``.

        Padding with a real page id (0) keeps every entry a valid index for ``index_select``;
        the lengths tell the kernel which gathered slots are real.
        """
        rows = [self.pages(s, layer) for s in seqs]
        lengths = [self.num_tokens(s, layer) for s in seqs]
        width = max((len(r) for r in rows), default=0)
        padded = [r + [0] * (width - len(r)) for r in rows]
        table = torch.tensor(padded, dtype=dtype).reshape(len(rows), width)
        return table.to(device), torch.tensor(lengths, dtype=dtype).to(device)
