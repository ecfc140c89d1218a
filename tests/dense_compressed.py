"""The dense oracle of the paged compression path, shared by the VAR and Infinity tests.

The reference contiguous cache, compressed after each layer's attention by the same selection
policy on dense tensors and on each scale's h x w map: what a paged engine must reproduce."""

from __future__ import annotations

from engine.reference import ContiguousKVCache
from memory.policies import SelectionContext


class DenseCompressedCache(ContiguousKVCache):
    def __init__(self, softmax_scales, plan, policy, shapes) -> None:
        """``shapes``: each scale's token map as (height, width)."""
        super().__init__(softmax_scales=softmax_scales)
        self.plan, self.policy, self.shapes = plan, policy, shapes

    def attend(self, layer, q, k, v):
        hist = 0 if self.k[layer] is None else self.k[layer].shape[2]
        out = super().attend(layer, q, k, v)
        si, keys = self.scale_index, self.k[layer]
        keep = self.plan.kept[si][layer]
        if keep == 0:
            self.k[layer] = self.v[layer] = None
        elif keep < keys.shape[2] or self.policy.observes_every_step:
            h, w = self.shapes[si]
            ctx = SelectionContext(layer=layer, scale=si, height=h, width=w, hist_len=hist, capacity=keep,
                                   softmax_scale=self.softmax_scales[layer], seqs=tuple(range(keys.shape[0])))
            idx = self.policy.select(ctx, q, keys)
            if idx is not None:
                gidx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
                self.k[layer], self.v[layer] = keys.gather(2, gidx), self.v[layer].gather(2, gidx)
        return out
