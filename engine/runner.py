"""``ModelRunner``: one scale step for a batch of requests that may be at different scales.

All tokens of all sequences in the step are packed into one row ``[1, T, C]``, so every linear
layer (qkv, projections, MLP) runs once over the whole batch. Attention runs per group of
sequences at the same scale, through the block-paged pool: queries are the group's current
tokens, keys/values its pages (the layer's kept history) plus the current tokens. Right after a
layer's attention, the tokens that layer keeps are written to its pages (the write-back hook;
with ``full``, all current tokens are appended) and the current K/V, which lived only in this
step's scratch, are dropped.

Compression (a plan that keeps fewer tokens than history + current): the request's selection
policy (``memory.policies``) picks, per sequence and head, which candidates survive, using the
layer's real queries. The history is gathered from the pool (a copy), so the layer's pages can
be rewritten in place from slot 0 with the kept tokens; pages no longer needed go straight back
to the pool (``MemoryManager.set_tokens``). Heads keep equal counts so page slots stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memory.attention import FlashInferPaged, attend_paged_written, paged_attention, resolve_backend
from memory.manager import KVPlan, MemoryManager
from memory.policies import SelectionPolicy
from memory.pool import KVPool

from .kv_writeback import KVWriteBack
from .models.registry import LoadedModel
from .precision import inference_context, inference_module
from .request import ImageRequest
from .sampling import sample_scale


@dataclass
class RequestState:
    """What the engine tracks for one running request (two sequences with CFG)."""

    request: ImageRequest
    seqs: tuple[int, int]  # (conditional, unconditional) sequence ids
    plan: KVPlan
    generator: torch.Generator
    f_hat: torch.Tensor  # accumulated feature map [1, Cvae, H, W]
    scale: int = 0  # next scale to run
    next_input: torch.Tensor | None = None  # [1, p^2, Cvae] for scale > 0
    tokens: list[torch.Tensor] = field(default_factory=list)
    t_arrival: float = 0.0
    t_admitted: float = 0.0
    t_first_scale: float | None = None
    policy: SelectionPolicy | None = None  # chooses kept tokens when the plan compresses


@dataclass
class _Group:
    """Sequences at one scale, laid out [cond of each request ..., uncond of each request ...]."""

    scale: int
    states: list[RequestState]
    seqs: list[int]
    start: int  # first packed token
    length: int  # tokens per sequence (p^2)

    seq_start: int = 0  # first row of this group in the step's condition / modulation rows
    io: list[_LayerIO] = field(default_factory=list)  # per layer, built once per step

    @property
    def num_tokens(self) -> int:
        return len(self.seqs) * self.length


@dataclass
class _LayerIO:
    """What one layer of one group reads and writes in this step, prepared before the blocks run.

    ``hist`` are host ints (no device sync to learn a shape). ``table`` [S, P] holds the layer's
    pages. ``written``: every sequence appends its current tokens and has the same history, so the
    current K/V are written to their slots (``write_pages``/``write_offsets`` [S, Lq]) *before*
    attention and attention reads [history; current] from the pages (``gather_ids`` [S * n]:
    the first n = ceil(total / block) pages of each sequence), with no copy into a scratch
    buffer. Otherwise the layer runs the general path (gather with masks, write-back after)."""

    hist: list[int]
    table: torch.Tensor | None = None
    written: bool = False
    total: int = 0
    write_pages: torch.Tensor | None = None
    write_offsets: torch.Tensor | None = None
    gather_ids: torch.Tensor | None = None
    flashinfer: tuple | None = None  # host (qo_indptr, kv_indptr, kv_indices, last_page_len)


class ModelRunner(KVWriteBack):
    def __init__(self, model: LoadedModel, pool: KVPool, manager: MemoryManager, dtype: str = "float32",
                 attention_backend: str = "torch") -> None:
        self.model = model
        self.var, self.vae = model.var, model.vae
        self.config = model.spec.var
        self.pool, self.manager = pool, manager
        self.dtype = dtype
        self.device = next(self.var.parameters()).device
        self.var = inference_module(self.var, dtype, self.device)  # CUDA + bf16: weights cast once
        self.backend = resolve_backend(attention_backend, self.device)
        self.softmax_scales = [b.attn.softmax_scale for b in self.var.blocks]
        self._groups: list[_Group] = []
        self._flashinfer: FlashInferPaged | None = None
        if self.backend == "flashinfer":
            self._flashinfer = FlashInferPaged.create(self.device, pool)

    def _autocast(self):
        return inference_context(self.dtype, self.device)

    # ----- per-step page bookkeeping (host side, one copy to the device) -----------------------
    def _prepare(self) -> None:
        """Build every group's per-layer ``_LayerIO`` for this step: history lengths as host ints,
        page tables, and for layers that append, the pages they grow into (allocated now, which
        the plan's reservation covers: a scale holds max(before, after) pages per layer) and the
        slot mapping of the write. All index tensors are made on the host and moved to the
        device in one (pinned, non-blocking) copy."""
        bs, table = self.pool.block_size, self.manager.table
        host: list[torch.Tensor] = []
        pending: list[tuple[_LayerIO, str, int, tuple[int, ...]]] = []

        def stage(io: _LayerIO, name: str, t: torch.Tensor) -> None:
            pending.append((io, name, len(host), tuple(t.shape)))
            host.append(t.reshape(-1).to(torch.long))

        for g in self._groups:
            n, si, lq = len(g.states), g.scale, g.length
            g.io = []
            # Pages are handed out up front only when every layer of every sequence appends: a
            # plan that compresses some layer at this scale is sized for growth in layer order
            # (a later layer grows after an earlier one has shrunk), which up-front allocation
            # of the growing layers would break.
            all_append = all(g.states[i % n].plan.kept[si][layer] == table.num_tokens(seq, layer) + lq
                             for layer in range(self.config.depth) for i, seq in enumerate(g.seqs))
            for layer in range(self.config.depth):
                hist = [table.num_tokens(seq, layer) for seq in g.seqs]
                io = _LayerIO(hist=hist)
                appends = all_append
                for i, _seq in enumerate(g.seqs):
                    st = g.states[i % n]
                    keep = st.plan.kept[si][layer]
                    if keep != hist[i] + lq or keep == 0 or (st.policy is not None and st.policy.observes_every_step):
                        appends = False
                        break
                io.written = appends and all(h == hist[0] for h in hist) and self.backend != "xformers"
                if io.written:
                    io.total = hist[0] + lq
                    rows = [self.manager.ensure_capacity(seq, layer, io.total) for seq in g.seqs]
                else:
                    rows = [table.pages(seq, layer) for seq in g.seqs]
                width = max((len(r) for r in rows), default=0)
                padded = [r + [0] * (width - len(r)) for r in rows]
                pages = torch.tensor(padded, dtype=torch.long).view(len(rows), width)
                stage(io, "table", pages)
                if io.written:
                    slots = torch.arange(hist[0], io.total)
                    stage(io, "write_pages", pages[:, slots // bs])
                    stage(io, "write_offsets", (slots % bs).expand(len(rows), lq))
                    if hist[0] > 0:
                        stage(io, "gather_ids", pages[:, : -(-io.total // bs)])
                        if self._flashinfer is not None:
                            npg = -(-io.total // bs)
                            s_ = len(rows)
                            io.flashinfer = (
                                torch.arange(s_ + 1, dtype=torch.int32) * lq,
                                torch.arange(s_ + 1, dtype=torch.int32) * npg,
                                pages[:, :npg].reshape(-1).to(torch.int32),
                                torch.full((s_,), io.total - (npg - 1) * bs, dtype=torch.int32),
                            )
                g.io.append(io)
        if not host:
            return
        flat = torch.cat(host)
        if self.pool.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.pool.device, non_blocking=True)
        offsets = [0]
        for t in host:
            offsets.append(offsets[-1] + t.numel())
        for io, name, k, shape in pending:
            setattr(io, name, flat[offsets[k] : offsets[k + 1]].view(shape))

    # ----- attention through the pool ------------------------------------------------------
    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [1, H, T, D] of the packed row -> attention output [1, H, T, D] (a view of a
        token-major buffer, so the caller's transpose back to [1, T, C] needs no copy)."""
        h, d = q.shape[1], q.shape[3]
        total_tokens = q.shape[2]
        buf = q.new_empty((1, total_tokens, h, d))
        kv = self.pool.kv
        for g in self._groups:
            n, lq = len(g.seqs), g.length

            def part(t: torch.Tensor, g: _Group = g, n: int = n, lq: int = lq) -> torch.Tensor:
                return t[0, :, g.start : g.start + g.num_tokens].reshape(h, n, lq, d).transpose(0, 1)

            qg, kg, vg = part(q), part(k), part(v)
            io = g.io[layer]
            scale = self.softmax_scales[layer]
            if io.written and kg.dtype == kv.dtype:
                # write the current tokens first; then [history; current] is all in the pages
                kv[:, 0].index_put_((io.write_pages, io.write_offsets), kg.transpose(1, 2))
                kv[:, 1].index_put_((io.write_pages, io.write_offsets), vg.transpose(1, 2))
                if io.hist[0] == 0:
                    out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, scale=scale)
                elif self._flashinfer is not None and io.flashinfer is not None and self._flashinfer.supports(qg):
                    out = self._flashinfer.attend(qg, self.pool, io.flashinfer, scale)
                else:
                    out = attend_paged_written(qg, self.pool, io.gather_ids, io.total, scale)
                for seq in g.seqs:
                    self.manager.set_tokens(seq, layer, io.total)
            else:
                out = paged_attention(qg, kg, vg, self.pool, io.table, io.hist, scale,
                                      "torch" if self.backend == "flashinfer" else self.backend)
                self._write_back(layer, g, kg, vg, io.hist, q=qg)
            buf[0, g.start : g.start + g.num_tokens].view(n, lq, h, d).copy_(out.transpose(1, 2))
        return buf.transpose(1, 2)

    def _map_shape(self, g: _Group) -> tuple[int, int]:
        side = self.config.patch_nums[g.scale]
        return side, side

    def _history_table(self, g: _Group, layer: int, rows: list[int], seqs: list[int]) -> torch.Tensor:
        """The step's staged block table (built once per step) where there is one."""
        if g.io:
            return g.io[layer].table[torch.tensor(rows)]
        return super()._history_table(g, layer, rows, seqs)

    # ----- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, states: list[RequestState]) -> list[torch.Tensor]:
        """Run the next scale of every request in ``states``; returns each request's sampled
        tokens [p^2] and advances its state (scale, f_hat, next input)."""
        var, var_config = self.var, self.config
        by_scale: dict[int, list[RequestState]] = {}
        for st in states:
            by_scale.setdefault(st.scale, []).append(st)
        self._groups, xs, conds, start = [], [], [], 0
        with self._autocast():
            results: dict[int, torch.Tensor] = {}
            for si in sorted(by_scale):
                sts = by_scale[si]
                n = len(sts)
                labels = torch.tensor([s.request.class_label for s in sts] + [var_config.num_classes] * n,
                                      device=self.device)
                cond = var.condition(labels)
                nxt = None
                if si > 0:
                    nxt = torch.cat([s.next_input for s in sts])
                    nxt = torch.cat((nxt, nxt))
                x = var.embed_scale(si, cond, nxt)
                seqs = [s.seqs[0] for s in sts] + [s.seqs[1] for s in sts]
                g = _Group(scale=si, states=sts, seqs=seqs, start=start, length=x.shape[1])
                self._groups.append(g)
                start += g.num_tokens
                xs.append(x.reshape(-1, x.shape[-1]))
                conds.append(cond)
            x = torch.cat(xs).unsqueeze(0)
            cond_all = torch.cat(conds)
            seq_off = 0
            for g in self._groups:
                g.seq_start = seq_off
                seq_off += len(g.seqs)
            segments = [(g.start, g.seq_start, len(g.seqs), g.length) for g in self._groups]
            self._prepare()
            for block in var.blocks:
                mods = block.ada_lin(cond_all).view(-1, 6, var_config.width)  # per sequence, not per token
                x = block.forward_segments(x, mods, segments, self._attend)
            step_tokens: list[torch.Tensor] = []
            for g in self._groups:
                n2 = len(g.seqs)
                xg = x[0, g.start : g.start + g.num_tokens].reshape(n2, g.length, -1)
                logits = var.logits(xg, cond_all[g.seq_start : g.seq_start + n2])
                n = len(g.states)
                reqs = [s.request for s in g.states]
                gens = [s.generator for s in g.states]
                idx = sample_scale(logits[:n], logits[n:], reqs, gens, g.scale, var_config.num_scales).to(self.device)
                f_hat, nxt = self.vae.quantize.advance(torch.cat([s.f_hat for s in g.states]), g.scale, idx)
                for i, st in enumerate(g.states):
                    st.f_hat = f_hat[i : i + 1]
                    st.next_input = None if nxt is None else nxt[i : i + 1]
                    st.scale += 1
                    results[id(st)] = idx[i]
                step_tokens.append(idx.reshape(-1))
            # one device-to-host copy of every token of the step, split on the host
            host = torch.cat(step_tokens).cpu()
            off = 0
            for g in self._groups:
                for st in g.states:
                    st.tokens.append(host[off : off + g.length])
                    off += g.length
        self._groups = []
        return [results[id(st)] for st in states]

    @torch.no_grad()
    def decode(self, states: list[RequestState]) -> torch.Tensor:
        """Finished requests -> images [B, 3, H, W] in [-1, 1] (one batched decoder pass).

        Tokens do not depend on what else is in the batch, but pixels may move by one 8-bit level:
        CPU conv kernels block their work by batch size, which changes float rounding."""
        return self.vae.fhat_to_img(torch.cat([s.f_hat for s in states]))
