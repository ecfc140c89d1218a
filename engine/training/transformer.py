"""Train the VAR transformer on pre-tokenised synthetic images (teacher forcing, all scales).

The dataset is rendered and tokenised once (``pretokenize``) with the trained tokenizer; each
step then only embeds ground-truth tokens into the next-scale inputs, which is cheap next to
the transformer. Per-scale token accuracy is logged, as VAR's trainer does per resolution.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.data.shapes import TRAIN_SEED, render_batch
from engine.models.registry import get_spec, load_into, save_safetensors
from engine.models.var import VAR
from engine.models.vqvae import VQVAE

from .common import RunDir, autocast, lr_at, to_model_input


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
    bf16: bool = True
    device: str = "cpu"
    seed: int = 0
    save_every: int = 20
    log_every: int = 10


@torch.no_grad()
def pretokenize(vae: VQVAE, num_images: int, out: Path, batch: int = 250, progress: bool = True) -> None:
    """Render and encode ``num_images`` training images once: ``tokens.npy`` [N, L] int16 and
    ``labels.npy`` [N] int64 in ``out``. Resumable: skips work already on disk."""
    tok_path, lab_path = out / "tokens.npy", out / "labels.npy"
    if tok_path.exists() and lab_path.exists() and len(np.load(lab_path, mmap_mode="r")) == num_images:
        return
    chunks, labels = [], []
    for start in tqdm(range(0, num_images, batch), desc="pretokenize", disable=not progress):
        imgs, lab = render_batch(TRAIN_SEED, start, min(batch, num_images - start))
        idx = vae.img_to_indices(to_model_input(imgs, vae.cfg.image_size))
        chunks.append(torch.cat(idx, dim=1).to(torch.int16).numpy())
        labels.append(lab)
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


def train_transformer(cfg: TransformerTrainConfig, run_dir: str, progress: bool = True) -> VAR:
    spec = get_spec(cfg.model)
    run = RunDir(run_dir)
    vae = VQVAE(spec.vae)
    load_into(vae, cfg.tokenizer)
    vae.eval()
    pretokenize(vae, cfg.num_images, run.path, progress=progress)
    tokens = torch.from_numpy(np.load(run.path / "tokens.npy").astype(np.int64))
    labels = torch.from_numpy(np.load(run.path / "labels.npy"))

    torch.manual_seed(cfg.seed)
    var = VAR(spec.var).to(cfg.device)
    opt = torch.optim.AdamW(param_groups(var, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = run.resume(var, opt, gen)
    var.train()
    lens = spec.var.scale_lengths()
    bar = tqdm(total=cfg.steps, initial=step, desc="transformer", disable=not progress, dynamic_ncols=True)
    t_last = time.time()
    while step < cfg.steps:
        pick = torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=gen)
        gt, lab = tokens[pick].to(cfg.device), labels[pick].to(cfg.device)
        with torch.no_grad():
            inputs = vae.quantize.teacher_forcing_input(split_scales(gt, spec.var.patch_nums))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        with autocast(cfg.device, cfg.bf16):
            logits = var(lab, inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                hit = (logits.argmax(-1) == gt).float().mean(0)
                acc = [round(float(a.mean()), 4) for a in hit.split(lens)]
            rec = {"step": step, "loss": loss.item(), "acc_per_scale": acc,
                   "img_per_s": step * cfg.batch_size / max(elapsed, 1e-9), "elapsed_s": elapsed}
            run.log(rec)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc_last=acc[-1], ips=f"{rec['img_per_s']:.1f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            run.checkpoint(var, opt, gen, step, elapsed, asdict(cfg))
    bar.close()
    var.eval()
    return var


def export_transformer(var: VAR, path: str) -> None:
    save_safetensors(var, path, half=True)
