"""Train the VAR transformer on pre-tokenised synthetic images (teacher forcing).

The dataset is rendered and tokenised once (``pretokenize``) with the trained tokenizer; each
step then only embeds ground-truth tokens into the next-scale inputs, which is cheap next to
the transformer. Per-scale token accuracy is logged, as VAR's trainer does per resolution.

Coarse-prefix steps (``coarse_scales``/``full_every``): a scale never attends to a finer one,
so a forward over the first K scales gives exactly the logits of those positions in the full
forward. The coarse and middle scales fix layout and shape (what makes a sample recognisable)
but hold few tokens (255 of 680 up to 10x10 on var-tiny), so most steps can train on that prefix
alone at about a third of the cost, and every ``full_every``-th step on all scales keeps the
fine scales trained.

Self-correction (``perturb_rate``): with plain teacher forcing the model only ever sees the
tokenizer's own tokens as its input, but at sampling time it reads its own draws, which differ
from them in a third or more of the fine-scale tokens. Following Infinity's bitwise
self-correction, a fraction of each scale's tokens (uniform in [0, perturb_rate] per image and
scale) is replaced by a nearby code before it is fed on, and the later scales' targets are
re-quantised from what is then left to reach the ground-truth map, so the model learns to
correct earlier mistakes instead of continuing them. ``codebook_neighbours`` picks "nearby":
the replacement is one of the code's nearest codebook entries, the kind of confusion a model
that has the coarse picture right makes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.models.registry import get_spec, load_into, save_safetensors
from engine.models.var import VAR
from engine.models.vqvae import VQVAE, MultiScaleQuantizer, NextScaleInput
from engine.precision import autocast_for
from training.shapes import TRAIN_SEED, render_batch

from .common import RunDir, lr_at, to_model_input


@dataclass
class TransformerTrainConfig:
    model: str = "var-tiny"
    tokenizer: str = "engine/models/weights/var-tiny/tokenizer.safetensors"
    num_images: int = 20_000  # size of the pre-tokenised training set
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    dtype: str = "auto"  # auto | float32 | bfloat16 (auto: bf16 only where the hardware runs it natively)
    device: str = "cpu"
    init_from: str | None = None  # transformer weights to start a new run from (a fresh run starts at random)
    coarse_scales: int | None = None  # train most steps on the first K scales only (None: always all scales)
    full_every: int = 1  # with coarse_scales: every full_every-th step trains on all scales
    perturb_rate: float = 0.0  # self-correction: replace up to this fraction of each fed scale's tokens (0: off)
    perturb_neighbours: int = 8  # replacements are drawn from each code's this many nearest codebook entries
    seed: int = 0
    save_every: int = 20
    log_every: int = 10
    time_budget_s: float | None = None  # size the run to this many seconds of training (replaces ``steps``)
    render_workers: int = 1  # processes that render the training set (encoding runs on ``device``)
    # distillation: a trained transformer of the same tokenizer, schedule and vocabulary (e.g. the
    # shipped var-tiny) whose teacher-forced distributions the model also learns (soft targets)
    distill_from: str | None = None
    distill_model: str = "var-tiny"  # the teacher's named config
    distill_weight: float = 0.5  # loss = (1 - w) * cross-entropy + w * KL(teacher || model)


def _render_chunk(start_count: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Worker-process entry of ``pretokenize``: render one chunk of the training split."""
    return render_batch(TRAIN_SEED, *start_count)


@torch.no_grad()
def pretokenize(vae: VQVAE, num_images: int, out: Path, batch: int = 250, progress: bool = True,
                workers: int = 1) -> None:
    """Render and encode training images ``0..num_images-1`` once: ``tokens.npy`` [N, L] int16 and
    ``labels.npy`` [N] int64 in ``out``. Resumable and extendable: a set already on disk is kept
    and only the missing images are rendered, so a follow-up run with a larger ``num_images``
    (fresh images for a model that has seen the first ones) pays only for the new ones. A set
    at least as large is left as is; training reads its first ``num_images`` rows.

    Encoding runs wherever ``vae`` lives; with the encoder on a GPU, rendering (numpy, one core)
    is what is left, so ``workers`` > 1 renders chunks in that many processes. Every image
    depends on its index alone, so the set is the same for any ``workers``."""
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    tok_path, lab_path = out / "tokens.npy", out / "labels.npy"
    have = 0
    if tok_path.exists() and lab_path.exists():
        have = len(np.load(lab_path, mmap_mode="r"))
        if have >= num_images:
            return
    chunks = [np.load(tok_path)] if have else []
    labels = [np.load(lab_path)] if have else []
    device = next(vae.parameters()).device
    jobs = [(start, min(batch, num_images - start)) for start in range(have, num_images, batch)]
    pool = None
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))  # no CUDA state in children
        window = 4 * workers  # chunks in flight: bounds memory when encoding is slower than rendering
        rendered = (out for i in range(0, len(jobs), window) for out in pool.map(_render_chunk, jobs[i:i + window]))
    else:
        rendered = map(_render_chunk, jobs)
    try:
        for imgs, lab in tqdm(rendered, total=len(jobs), desc="pretokenize", disable=not progress):
            idx = vae.img_to_indices(to_model_input(imgs, vae.config.image_size).to(device))
            chunks.append(torch.cat(idx, dim=1).to(torch.int16).cpu().numpy())
            labels.append(lab)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    np.save(tok_path, np.concatenate(chunks))
    np.save(lab_path, np.concatenate(labels))


def split_scales(flat: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    return list(flat.split([p * p for p in patch_nums], dim=1))


def param_groups(var: VAR, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms' gains, positional/level embeddings and scale_mul."""
    decay, no_decay = [], []
    for name, p in var.named_parameters():
        if p.ndim < 2 or "pos_" in name or "lvl_embed" in name or "scale_mul" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate_config(config: TransformerTrainConfig, num_scales: int) -> None:
    """Reject impossible settings up front, naming the field."""
    for name in ("num_images", "steps", "batch_size", "full_every", "save_every", "log_every", "render_workers"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(config, name)}")
    if not 0.0 <= config.perturb_rate <= 1.0:
        raise ValueError(f"perturb_rate: must be in [0, 1], got {config.perturb_rate}")
    if config.perturb_neighbours < 1:
        raise ValueError(f"perturb_neighbours: must be >= 1, got {config.perturb_neighbours}")
    if config.coarse_scales is not None and not 2 <= config.coarse_scales <= num_scales:  # scale 1 alone has no input
        raise ValueError(f"coarse_scales: must be in [2, {num_scales}], got {config.coarse_scales}")
    if config.time_budget_s is not None and not config.time_budget_s > 0:
        raise ValueError(f"time_budget_s: must be > 0, got {config.time_budget_s}")
    if config.time_budget_s is not None and config.warmup < MIN_SIZING_WARMUP:
        raise ValueError(f"warmup: a time budget sizes the run from the warm-up's throughput, which needs "
                         f"warmup >= {MIN_SIZING_WARMUP}, got {config.warmup}")
    if config.init_from is not None and not Path(config.init_from).exists():
        raise ValueError(f"init_from: no such file {config.init_from!r}")
    if config.distill_from is not None and not Path(config.distill_from).exists():
        raise ValueError(f"distill_from: no such file {config.distill_from!r}")
    if not 0 <= config.distill_weight <= 1:
        raise ValueError(f"distill_weight: must be in [0, 1], got {config.distill_weight}")


@torch.no_grad()
def codebook_neighbours(q: MultiScaleQuantizer, n: int) -> torch.Tensor:
    """[V, n]: for each code, its ``n`` nearest other codes by embedding distance."""
    codes = q.embedding.weight.float()
    dist = torch.cdist(codes, codes)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(min(n, codes.shape[0] - 1), dim=1, largest=False).indices


@torch.no_grad()
def self_correction_batch(q: MultiScaleQuantizer, latent: torch.Tensor, gt: list[torch.Tensor], num_scales: int,
                          rate: float, neighbours: torch.Tensor,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing with perturbed inputs: the images' encoder latents [B, C, H, W] and their
    ground-truth tokens per scale -> (inputs and targets of the first ``num_scales`` scales:
    [B, L_k - 1, C] and [B, L_k]).

    Each fed scale has a fraction of its tokens (uniform in [0, rate] per image) replaced by a
    random one of their ``neighbours``. Once an image has been perturbed, each later scale's
    target is re-quantised from the residual between its latent and the perturbed map
    accumulated so far, exactly as the tokenizer encodes; until then its targets are its
    ground-truth tokens (which that re-quantisation reproduces). With rate 0 this is
    ``teacher_forcing_input`` and the ground truth.
    """
    b, device = latent.shape[0], latent.device
    latent = latent.float()
    state = NextScaleInput(q, b, device)
    drifted = torch.zeros(b, dtype=torch.bool, device=device)
    inputs, targets = [], []
    for si, tok in enumerate(gt[:num_scales]):
        if drifted.any():
            side = q.patch_nums[si]
            residual = latent - state.f_hat
            if si != q.num_scales - 1:
                residual = F.interpolate(residual, size=(side, side), mode="area")
            tok = torch.where(drifted[:, None], q.nearest_code(residual), tok)
        targets.append(tok)
        if si == num_scales - 1:
            break
        amount = torch.rand(b, 1, generator=gen) * rate
        flip = (torch.rand(tok.shape, generator=gen) < amount).to(device)
        pick = torch.randint(0, neighbours.shape[1], tok.shape, generator=gen).to(device)
        fed = torch.where(flip, neighbours.to(device)[tok, pick], tok)
        drifted |= flip.any(dim=1)
        inputs.append(state.add(si, fed))
    return torch.cat(inputs, dim=1), torch.cat(targets, dim=1)


@torch.no_grad()
def encode_training_images(vae: VQVAE, indices: torch.Tensor) -> torch.Tensor:
    """Render training images by index and encode them: latents [B, C, H, W]. Rendering is
    per index, so this is the same image ``pretokenize`` tokenised for that row."""
    imgs = np.concatenate([render_batch(TRAIN_SEED, int(i), 1)[0] for i in indices])
    device = next(vae.parameters()).device
    return vae.encode_latent(to_model_input(imgs, vae.config.image_size).to(device))


MIN_SIZING_WARMUP = 10  # warm-up steps a time budget needs to measure throughput over


class BudgetSizer:
    """Turns a wall-clock budget into a step count.

    The lr schedule's warm-up does not depend on the run's length, so the run can start with
    its length unknown, time its warm-up steps (after two settling steps: allocator and kernel
    selection) and then fix ``steps`` so that the budget's remainder is spent at that rate,
    before the cosine decay, which does depend on it, begins. A resumed run keeps the length
    its checkpoint recorded."""

    def __init__(self, budget_s: float, warmup: int, device: str, start_step: int = 0) -> None:
        self.budget_s, self.warmup, self.cuda = budget_s, warmup, torch.device(device).type == "cuda"
        self.settle_until = start_step + 2
        self.mark: tuple[int, float] | None = None  # (step, clock) where the timed window starts

    def _now(self) -> float:
        if self.cuda:  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize()
        return time.perf_counter()

    def after_step(self, step: int, elapsed: float) -> int | None:
        """Call after each step (``step`` steps done, ``elapsed`` seconds of training so far);
        returns the run's total steps once they are known, else None."""
        if self.mark is None and step >= self.settle_until and step < self.warmup:
            self.mark = (step, self._now())
        if step < self.warmup:
            return None
        if self.mark is not None and step > self.mark[0]:
            per_step = (self._now() - self.mark[1]) / (step - self.mark[0])
        else:  # resumed too close to the end of the warm-up to time it
            per_step = elapsed / max(step, 1)
        return step + max(1, int((self.budget_s - elapsed) / per_step))


def scales_at(step: int, config: TransformerTrainConfig, num_scales: int) -> int:
    """How many scales step ``step`` trains on (all of them on every full_every-th step)."""
    if config.coarse_scales is None or step % config.full_every == 0:
        return num_scales
    return config.coarse_scales


def load_teacher(config: TransformerTrainConfig, spec) -> VAR:
    """The frozen teacher of a distillation run; it must read the same inputs (tokenizer
    latent width, scale schedule, classes) and predict the same vocabulary."""
    tspec = get_spec(config.distill_model)
    same = ("patch_nums", "vocab_size", "z_channels", "num_classes")
    diff = [f for f in same if getattr(tspec.var, f) != getattr(spec.var, f)]
    if diff:
        raise ValueError(f"distill_model: {config.distill_model!r} differs from {config.model!r} in "
                         f"{', '.join(diff)}: a teacher must share the tokenizer, schedule and classes")
    teacher = VAR(tspec.var)
    load_into(teacher, config.distill_from)
    teacher.requires_grad_(False)
    return teacher.eval().to(config.device)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """(1 - weight) * the hard cross-entropy + weight * KL(teacher || model), per token: the
    teacher's whole distribution over the codes is a far richer target than its one sampled
    token, which is what makes a small CPU budget of images go further."""
    v = logits.shape[-1]
    kl = F.kl_div(F.log_softmax(logits.float().reshape(-1, v), -1),
                  F.log_softmax(teacher_logits.float().reshape(-1, v), -1), log_target=True, reduction="batchmean")
    return (1 - weight) * hard_loss + weight * kl


def train_transformer(config: TransformerTrainConfig, run_dir: str, progress: bool = True) -> VAR:
    spec = get_spec(config.model)
    validate_config(config, spec.var.num_scales)
    run = RunDir(run_dir)
    vae = VQVAE(spec.vae)
    load_into(vae, config.tokenizer)
    vae.eval()
    vae.to(config.device)  # encodes the training set and builds the transformer's inputs on config.device
    pretokenize(vae, config.num_images, run.path, progress=progress, workers=config.render_workers)
    # memory-mapped, so a larger set on disk costs only the rows this run uses
    tokens = torch.from_numpy(np.load(run.path / "tokens.npy", mmap_mode="r")[: config.num_images].astype(np.int64))
    labels = torch.from_numpy(np.array(np.load(run.path / "labels.npy", mmap_mode="r")[: config.num_images]))

    torch.manual_seed(config.seed)
    var = VAR(spec.var)
    teacher = load_teacher(config, spec) if config.distill_from is not None else None
    if config.init_from is not None:  # overwritten below when the run dir holds a checkpoint
        load_into(var, config.init_from)
    var = var.to(config.device)
    opt = torch.optim.AdamW(param_groups(var, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                            fused=torch.device(config.device).type == "cuda")
    gen = torch.Generator().manual_seed(config.seed)
    step, elapsed = run.resume(var, opt, gen)
    total: int | None = config.steps  # None while a time budget is still being sized
    sizer = None
    if config.time_budget_s is not None:
        saved = (run.resumed_config or {}).get("steps") if step >= config.warmup else None
        total = saved
        sizer = BudgetSizer(config.time_budget_s, config.warmup, config.device, step) if saved is None else None
    var.train()
    lens = spec.var.scale_lengths()
    n_scales = spec.var.num_scales
    neighbours = codebook_neighbours(vae.quantize, config.perturb_neighbours) if config.perturb_rate > 0 else None
    bar = tqdm(total=total, initial=step, desc="transformer", disable=not progress, dynamic_ncols=True)
    t_last = time.time()
    owe_full_log = False  # a log point fell on a prefix step: log the next full step as well
    while total is None or step < total:
        pick = torch.randint(0, tokens.shape[0], (config.batch_size,), generator=gen)
        gt, lab = tokens[pick].to(config.device), labels[pick].to(config.device)
        k = scales_at(step, config, n_scales)
        if config.perturb_rate > 0:
            latent = encode_training_images(vae, pick)
            inputs, gt = self_correction_batch(vae.quantize, latent, split_scales(gt, spec.var.patch_nums), k,
                                               config.perturb_rate, neighbours, gen)
        else:
            gt = gt[:, : sum(lens[:k])]
            with torch.no_grad():
                inputs = vae.quantize.teacher_forcing_input(split_scales(gt, spec.var.patch_nums[:k]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or config.warmup, config.lr, config.warmup)  # warm-up: independent of total
        with autocast_for(config.dtype, config.device):
            if teacher is None:
                logits = var(lab, inputs, num_scales=k)
            else:
                lab = var.drop_condition(lab)  # the teacher sees the same (dropped) labels
                logits = var(lab, inputs, num_scales=k, cond_drop=False)
                with torch.no_grad():
                    soft = teacher(lab, inputs, num_scales=k)
        hard = loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        if teacher is not None:
            loss = distillation_loss(logits, soft, hard, config.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), config.grad_clip)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        if sizer is not None and total is None:
            total = sizer.after_step(step, elapsed)
            if total is not None:
                bar.total = total
                bar.refresh()
                run.log({"step": step, "sized_steps": total, "time_budget_s": config.time_budget_s})
        at_log_point = step % config.log_every == 0 or step == total
        # with coarse steps, a log point can keep landing on prefix steps (e.g. full_every 2, log_every 10);
        # then the next full step is logged too, so the log always shows the fine scales' accuracy
        log_full_late = owe_full_log and k == n_scales
        owe_full_log = (owe_full_log or at_log_point) and k != n_scales
        if at_log_point or log_full_late:
            with torch.no_grad():
                hit = (logits.argmax(-1) == gt).float().mean(0)
                acc = [round(float(a.mean()), 4) for a in hit.split(lens[:k])]
            rec = {"step": step, "scales": k, "loss": loss.item(), "ce": hard.item(), "acc_per_scale": acc,
                   "img_per_s": step * config.batch_size / max(elapsed, 1e-9), "elapsed_s": elapsed}
            run.log(rec)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc_last=acc[-1], ips=f"{rec['img_per_s']:.1f}")
        if step % config.save_every == 0 or step == total:
            run.checkpoint(var, opt, gen, step, elapsed, asdict(replace(config, steps=total or config.steps)))
    bar.close()
    var.eval()
    return var


def export_transformer(var: VAR, path: str) -> None:
    save_safetensors(var, path, half=True)


def export_checkpoint(model: str, run_dir: str, path: str) -> int:
    """Write a run's latest resumable checkpoint as shipped-format weights (fp16 safetensors),
    without training: a run can be evaluated, calibrated or carried to another machine mid-way
    (a new run starts from the file with ``init_from``). Returns the checkpoint's step."""
    state = RunDir(run_dir).load()
    if state is None:
        raise ValueError(f"run_dir: no checkpoint in {run_dir!r} (ckpt.pt is written every save_every steps)")
    var = VAR(get_spec(model).var)
    var.load_state_dict(state["model"])
    export_transformer(var, path)
    return int(state["step"])
