"""Keeping each layer's tokens for later scales: the write-back both paged runners share.

Right after a layer's attention, where the plan keeps history + current the current tokens are
appended to the layer's pages; where it keeps fewer, the request's selection policy picks which
candidates survive (per sequence and head, on the scale's h x w map) and the pages are rewritten
from slot 0 with them; surplus pages go straight back to the pool. ``KVWriteBack`` is a mixin of
``ModelRunner`` (VAR) and ``InfinityRunner``: a runner provides ``pool``, ``manager``,
``softmax_scales`` and ``_map_shape(group)``; a group has ``scale``, ``states`` (each with
``plan`` and ``policy``), ``seqs`` and ``length``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from memory.attention import gather_kv
from memory.policies import SelectionContext, SelectionPolicy


class KVWriteBack(ABC):
    @abstractmethod
    def _map_shape(self, g: Any) -> tuple[int, int]:
        """The (height, width) token map of the group's current scale."""

    def _history_table(self, g: Any, layer: int, rows: list[int], seqs: list[int]) -> torch.Tensor:
        """Block table ``[S, pages]`` of the sequences' pages of this layer."""
        return self.manager.table.block_table_tensor(seqs, layer, device=self.pool.device)[0]

    def _write_back(self, layer: int, g: Any, k: torch.Tensor, v: torch.Tensor, hist: list[int],
                    q: torch.Tensor | None = None) -> None:
        """Keep this layer's tokens for later scales. Where the plan keeps history + current the
        current tokens are appended; where it keeps fewer, the state's policy chooses them.
        ``q``, ``k``, ``v``: the group's current-scale tensors ``[S, H, Lq, D]``."""
        si, n = g.scale, len(g.states)
        appends: list[int] = []
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for i, seq in enumerate(g.seqs):
            state = g.states[i % n]
            keep, held = state.plan.kept[si][layer], hist[i] + g.length
            if keep == 0:
                self.manager.set_tokens(seq, layer, 0)
                continue
            if keep > held:
                raise ValueError(f"plan {state.plan.name!r} keeps {keep} tokens at scale {si} layer {layer}, "
                                 f"the layer holds only {held}")
            policy = state.policy
            if keep == held and (policy is None or not policy.observes_every_step):
                appends.append(i)
                continue
            if policy is None:
                raise ValueError(
                    f"plan {state.plan.name!r} keeps {keep} tokens at scale {si} layer {layer} but no "
                    "compression policy is attached to choose them"
                )
            # sequences sharing policy, quota and history length are selected in one batch
            buckets.setdefault((id(policy), keep, hist[i]), []).append(i)
        if appends:
            idx = torch.tensor(appends, device=k.device)
            self._store(layer, [g.seqs[i] for i in appends], [hist[i] for i in appends],
                        k[idx].transpose(1, 2), v[idx].transpose(1, 2))
        for (_pid, keep, h), rows in buckets.items():
            self._compress(layer, g, g.states[rows[0] % n].policy, rows, keep, h, q, k, v)

    def _store(self, layer: int, seqs: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[S, T, H, D]`` of each sequence at its slots ``start .. start + T``
        of the layer's pages (growing them first), then record ``start + T`` kept tokens, which
        returns surplus pages to the pool. One ``index_put_`` per tensor for all sequences."""
        t, bs = k.shape[1], self.pool.block_size
        page_rows, slot_rows = [], []
        for seq, start in zip(seqs, starts):
            pages = self.manager.ensure_capacity(seq, layer, start + t)
            slots = torch.arange(start, start + t)
            page_rows.append(torch.tensor(pages, dtype=torch.long)[slots // bs])
            slot_rows.append(slots % bs)
        page_idx = torch.cat(page_rows).to(self.pool.device)
        offsets = torch.cat(slot_rows).to(self.pool.device)
        kind = torch.zeros_like(offsets)
        h, d = k.shape[2], k.shape[3]
        kv = self.pool.kv
        kv.index_put_((page_idx, kind, offsets), k.reshape(-1, h, d).to(device=kv.device, dtype=kv.dtype))
        kv.index_put_((page_idx, kind + 1, offsets), v.reshape(-1, h, d).to(device=kv.device, dtype=kv.dtype))
        for seq, start in zip(seqs, starts):
            self.manager.set_tokens(seq, layer, start + t)

    def _compress(self, layer: int, g: Any, policy: SelectionPolicy, rows: list[int], keep: int, hist: int,
                  q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
        """Select ``keep`` of (history + current) tokens for the sequences ``rows`` of the group
        and rewrite their pages with them from slot 0; surplus pages return to the pool."""
        if q is None:
            raise ValueError("compression needs the layer's queries (q)")
        seqs = [g.seqs[i] for i in rows]
        idx = torch.tensor(rows, device=k.device)
        qc, kc, vc = q[idx], k[idx], v[idx]
        if hist > 0:
            table = self._history_table(g, layer, rows, seqs)
            # host lengths (no device read-back); a copy: rewriting the pages below is safe
            kh, vh, _ = gather_kv(self.pool, table, [hist] * len(seqs))
            keys = torch.cat([kh.to(device=kc.device, dtype=kc.dtype), kc], dim=2)
            values = torch.cat([vh.to(device=vc.device, dtype=vc.dtype), vc], dim=2)
        else:
            keys, values = kc, vc
        height, width = self._map_shape(g)
        ctx = SelectionContext(layer=layer, scale=g.scale, height=height, width=width, hist_len=hist,
                               capacity=keep, softmax_scale=float(self.softmax_scales[layer]), seqs=tuple(seqs))
        chosen = policy.select(ctx, qc, keys)
        if chosen is None:  # an observing policy that evicts nothing at this scale
            if keep != keys.shape[2]:
                raise ValueError(f"policy {policy.name!r} kept everything but the plan keeps {keep} of "
                                 f"{keys.shape[2]} tokens")
            self._store(layer, seqs, [hist] * len(seqs), kc.transpose(1, 2), vc.transpose(1, 2))
            return
        s, h, _n, d = keys.shape
        if tuple(chosen.shape) != (s, h, keep):
            raise ValueError(f"policy {policy.name!r} returned indices {tuple(chosen.shape)}, expected {(s, h, keep)}")
        gidx = chosen.to(keys.device).unsqueeze(-1).expand(s, h, keep, d)
        self._store(layer, seqs, [0] * len(seqs), keys.gather(2, gidx).transpose(1, 2),
                    values.gather(2, gidx).transpose(1, 2))

