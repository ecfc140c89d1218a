"""``InfinityRunner``: one scale step for a batch of Infinity (text-to-image) requests that may
be at different scales, aspect ratios and resolutions; the sibling of ``runner.ModelRunner``
with the same interface (``step(states)``, ``decode(states)``).

Every request carries its own schedule (token grids (h, w) per scale, from its aspect ratio and
resolution), its RoPE angles (normalised to its aspect ratio's full grid), a ``NextScaleState``
(its accumulated codes) and its 2-row text condition ([cond ; uncond], computed once at
admission by ``prepare`` and reused at every scale: the pooled text, the shared AdaLN output
and every layer's cross-attention K/V).

A step packs all tokens of all sequences into one row ``[1, T, C]``, so every linear layer runs
once over the batch, and groups sequences by (scale index, (h, w)): a group's sequences have
the same number of queries, so its self-attention is one call through the block-paged pool
(history lengths may differ between ratios, which the pool's masks handle). RoPE angles are
per sequence, the text condition is packed per sequence (``InfinityCondition.packed``), and
the cross-attention runs per sequence on its own text. After the blocks, each group's logits
are guided and sampled bit by bit (``sample_scale_bits``), each request with its own
generator, so a request's bits do not depend on what else shares its step.

Every KV plan runs here: where a request's plan keeps history + current the current tokens
are appended; where it keeps fewer, right after the layer's attention, the request's selection
policy (``memory.policies``) chooses them on the scale's h x w map (``SelectionContext.height``
/ ``width``) and the layer's pages are rewritten with them, as ``runner.ModelRunner`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memory.attention import paged_attention
from memory.manager import KVPlan, MemoryManager
from memory.policies import SelectionPolicy
from memory.pool import KVPool

from .kv_writeback import KVWriteBack
from .models.bsq import NextScaleState
from .models.infinity import InfinityCondition
from .models.registry import LoadedInfinity
from .precision import autocast_for
from .reference import image_to_uint8
from .request import ImageRequest
from .sampling import sample_scale_bits


@dataclass
class InfinityRequestState:
    """What the engine tracks for one running Infinity request (two sequences with CFG).

    ``request`` is resolved (cfg, tau, top_k, top_p and resolution filled in); ``h_div_w`` is
    the aspect-ratio template it was snapped to."""

    request: ImageRequest
    seqs: tuple[int, int]  # (conditional, unconditional) sequence ids
    plan: KVPlan
    generator: torch.Generator
    h_div_w: float
    schedule: tuple[tuple[int, int], ...]
    rope_grid: tuple[int, int]
    text: torch.Tensor  # prompt encoder states [T, text_channels]
    negative_text: torch.Tensor | None = None
    scale: int = 0  # next scale to run
    angles: list[torch.Tensor] | None = None  # per scale [h w, head_dim / 2] (set by prepare)
    cond: InfinityCondition | None = None  # 2 rows (set by prepare)
    state: NextScaleState | None = None  # accumulated codes (set by prepare)
    next_input: torch.Tensor | None = None  # [1, h w, token_bits] for scale > 0
    tokens: list[torch.Tensor] = field(default_factory=list)  # bits per scale [h w, token_bits] uint8
    t_arrival: float = 0.0
    t_admitted: float = 0.0
    t_first_scale: float | None = None
    policy: SelectionPolicy | None = None

    @property
    def num_scales(self) -> int:
        return len(self.schedule)

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.schedule]

    @property
    def cond_bytes(self) -> int:
        """Bytes of the stored condition: every layer's text K and V of both rows, plus the
        pooled vector and AdaLN rows (depth x 2 x 2 rows x T x C x bytes, dominant)."""
        if self.cond is None:
            return 0
        c = self.cond
        tensors = [c.pooled, c.gss, c.text_mask, *c.text_k, *c.text_v]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Group:
    """Sequences at one (scale, grid), laid out [cond of each request ..., uncond of each ...]."""

    scale: int
    hw: tuple[int, int]
    states: list[InfinityRequestState]
    seqs: list[int]
    start: int  # first packed token
    row: int  # first row of the step's condition
    length: int  # tokens per sequence (h w)

    @property
    def num_tokens(self) -> int:
        return len(self.seqs) * self.length


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits [..., d] (0/1) -> one integer per token, bit 0 the most significant (weights
    2^(d-1) .. 1). d <= 62 fits int64 (the released models have 32 and 56)."""
    d = bits.shape[-1]
    if d > 62:
        raise ValueError(f"cannot pack {d} bits into an int64")
    weights = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64, device=bits.device)
    return (bits.to(torch.int64) * weights).sum(-1)


def unpack_bits(values: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: ints [...] -> bits [..., d] uint8."""
    shifts = torch.arange(d - 1, -1, -1, dtype=torch.int64, device=values.device)
    return ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)


def _rows_condition(pooled: torch.Tensor) -> InfinityCondition:
    """A condition carrying only the pooled rows: what ``embed_scale`` (scale 0) and the head
    read; the blocks get the full step condition."""
    empty = pooled.new_zeros((pooled.shape[0], 0), dtype=torch.bool)
    return InfinityCondition(pooled, pooled.new_zeros((pooled.shape[0], 1, 6, 0)), [], [], empty)


class InfinityRunner(KVWriteBack):
    def __init__(self, model: LoadedInfinity, pool: KVPool, manager: MemoryManager, dtype: str = "float32",
                 attention_backend: str = "torch") -> None:
        self.loaded = model
        self.model, self.tokenizer = model.model, model.tokenizer
        self.cfg = model.spec.model
        self.pool, self.manager = pool, manager
        self.dtype = dtype
        self.backend = attention_backend
        self.device = model.model.pos_start.device
        self.softmax_scales = model.softmax_scales  # 1.0: q is normalised and scaled in the model
        self._groups: list[_Group] = []
        self._angles: dict[tuple, list[torch.Tensor]] = {}
        self._step_cond: tuple[tuple[int, ...], InfinityCondition] | None = None

    def _autocast(self):
        return autocast_for(self.dtype, self.device)

    # ----- admission ----------------------------------------------------------------------
    def angles_for(self, schedule: tuple[tuple[int, int], ...], grid: tuple[int, int]) -> list[torch.Tensor]:
        key = (schedule, grid)
        if key not in self._angles:
            self._angles[key] = self.model.rope(schedule, grid)
        return self._angles[key]

    @torch.no_grad()
    def prepare(self, states: list[InfinityRequestState]) -> None:
        """At admission: each request's 2-row condition (alone, so it does not depend on the
        other requests), its RoPE angles and its code accumulator."""
        with self._autocast():
            for st in states:
                if st.cond is None:
                    st.cond = self.model.cfg_condition([st.text], [st.negative_text])
                st.angles = self.angles_for(st.schedule, st.rope_grid)
                if st.state is None:
                    st.state = NextScaleState(self.tokenizer, st.schedule, 1, self.device)

    def release(self, st: InfinityRequestState) -> None:
        """Drop what a finished request holds (its condition; the step cache if it names it)."""
        st.cond = None
        if self._step_cond is not None and st.seqs[0] in self._step_cond[0]:
            self._step_cond = None

    def _condition(self, groups: list[_Group]) -> InfinityCondition:
        """The step's rows ([cond ; uncond] of each group, group after group), concatenated from
        the requests' own conditions; reused while the step's composition does not change."""
        key = tuple(s for g in groups for s in g.seqs)
        if self._step_cond is not None and self._step_cond[0] == key:
            return self._step_cond[1]
        rows = [st.cond.select([r]) for g in groups for r in (0, 1) for st in g.states]
        cond = InfinityCondition.cat(rows) if len(rows) > 1 else rows[0]
        self._step_cond = (key, cond)
        return cond

    # ----- attention through the pool ------------------------------------------------------
    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        h, d = q.shape[1], q.shape[3]
        for g in self._groups:
            n, lq = len(g.seqs), g.length

            def part(t: torch.Tensor, g: _Group = g, n: int = n, lq: int = lq) -> torch.Tensor:
                return t[0, :, g.start : g.start + g.num_tokens].reshape(h, n, lq, d).transpose(0, 1)

            qg, kg, vg = part(q), part(k), part(v)
            table, hist = self.manager.table.block_table_tensor(g.seqs, layer, device=self.pool.device)
            out = paged_attention(qg, kg, vg, self.pool, table, hist, float(self.softmax_scales[layer]),
                                  self.backend)
            self._write_back(layer, g, kg, vg, hist.tolist(), q=qg)
            outs.append(out.transpose(0, 1).reshape(h, g.num_tokens, d))
        return torch.cat(outs, dim=1).unsqueeze(0)

    # ----- one step ---------------------------------------------------------------------------
    def _map_shape(self, g: _Group) -> tuple[int, int]:
        return g.hw

    @torch.no_grad()
    def step(self, states: list[InfinityRequestState]) -> list[torch.Tensor]:
        """Run the next scale of every request in ``states``; returns each request's sampled
        bits [h w, token_bits] and advances its state (scale, codes, next input)."""
        model = self.model
        self.prepare([st for st in states if st.cond is None or st.state is None])
        by_key: dict[tuple[int, tuple[int, int]], list[InfinityRequestState]] = {}
        for st in states:
            by_key.setdefault((st.scale, st.schedule[st.scale]), []).append(st)
        groups, start, row = [], 0, 0
        for (si, hw), sts in sorted(by_key.items()):
            seqs = [s.seqs[0] for s in sts] + [s.seqs[1] for s in sts]
            groups.append(_Group(si, hw, sts, seqs, start, row, hw[0] * hw[1]))
            start += len(seqs) * hw[0] * hw[1]
            row += len(seqs)
        results: dict[int, torch.Tensor] = {}
        try:
            with self._autocast():
                cond = self._condition(groups)
                xs, angles = [], []
                for g in groups:
                    n = len(g.states)
                    if g.scale == 0:
                        x = model.embed_scale(0, _rows_condition(cond.pooled[g.row : g.row + 2 * n]), None)
                    else:
                        nxt = torch.cat([s.next_input for s in g.states])
                        x = model.embed_scale(g.scale, cond, torch.cat((nxt, nxt)))
                    xs.append(x.reshape(-1, x.shape[-1]))
                    per_req = [s.angles[g.scale] for s in g.states]
                    angles.extend(per_req + per_req)
                self._groups = groups
                x = torch.cat(xs).unsqueeze(0)
                segments = [g.length for g in groups for _ in g.seqs]
                x = model.run_blocks(x, cond.packed(segments), self._attend, torch.cat(angles))
                for g in groups:
                    n = len(g.states)
                    xg = x[0, g.start : g.start + g.num_tokens].reshape(2 * n, g.length, -1)
                    logits = model.logits(xg, _rows_condition(cond.pooled[g.row : g.row + 2 * n]))
                    bits = sample_scale_bits(logits[:n], logits[n:], [s.request for s in g.states],
                                             [s.generator for s in g.states]).to(self.device)
                    for i, st in enumerate(g.states):
                        st.next_input = st.state.add(g.scale, bits[i : i + 1])
                        st.tokens.append(bits[i].cpu())
                        st.scale += 1
                        results[id(st)] = bits[i]
        finally:
            self._groups = []
        return [results[id(st)] for st in states]

    @torch.no_grad()
    def decode(self, states: list[InfinityRequestState]) -> list[torch.Tensor]:
        """Finished requests -> one uint8 image [H, W, 3] each; requests with the same output
        shape are decoded in one batched pass."""
        out: list[torch.Tensor | None] = [None] * len(states)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, st in enumerate(states):
            by_shape.setdefault(tuple(st.state.f_hat.shape[-2:]), []).append(i)
        for rows in by_shape.values():
            imgs = image_to_uint8(self.tokenizer.decode(torch.cat([states[i].state.f_hat for i in rows])))
            for j, i in enumerate(rows):
                out[i] = imgs[j]
        return out
