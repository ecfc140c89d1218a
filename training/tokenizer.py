"""Train the multi-scale VQ tokenizer on the synthetic shapes dataset.

Loss: pixel MSE + 0.2 * L1 + the quantiser's commitment/codebook loss. Images are rendered on
the fly (an unbounded, seeded stream). Dead codes (EMA usage far below uniform) are restarted
from the current batch's residual vectors so codebook usage cannot collapse.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.models.registry import get_spec, save_safetensors
from engine.models.vqvae import VQVAE, psnr
from engine.precision import autocast_for
from training.shapes import EVAL_SEED, TRAIN_SEED, render_batch

from .common import RunDir, lr_at, to_model_input


@dataclass
class TokenizerTrainConfig:
    model: str = "var-tiny"
    steps: int = 1300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    l1_weight: float = 0.2
    dtype: str = "auto"  # auto | float32 | bfloat16 (auto: bf16 only where the hardware runs it natively)
    device: str = "cpu"
    seed: int = 0
    save_every: int = 100
    log_every: int = 25
    restart_every: int = 100  # dead-code restart period (steps)
    dead_threshold: float = 0.03  # a code is dead when its usage < threshold x uniform
    eval_images: int = 256


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, latents: torch.Tensor, threshold: float, gen: torch.Generator) -> int:
    """Replace codes whose EMA hit rate (max over scales) is below ``threshold / V`` by random
    latent vectors of the batch (plus a little noise). Returns the number restarted."""
    q = vae.quantize
    v = q.config.vocab_size
    usage = q.ema_vocab_hit_SV.max(dim=0).values
    dead = (usage < threshold / v).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pool = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=gen)
    noise = torch.randn(dead.numel(), pool.shape[1], generator=gen) * pool.std() * 0.05
    q.embedding.weight[dead] = (pool[pick] + noise).to(q.embedding.weight.dtype)
    q.ema_vocab_hit_SV[:, dead] = 1.0 / v  # give restarted codes time to be used
    return int(dead.numel())


@torch.no_grad()
def evaluate_tokenizer(vae: VQVAE, num_images: int = 1000, batch: int = 100, dtype: str = "float32") -> dict:
    """Reconstruction PSNR on held-out images (seed ``EVAL_SEED``) and per-scale codebook usage."""
    was_training = vae.training
    vae.eval()
    scores, used = [], [set() for _ in vae.config.patch_nums]
    for start in range(0, num_images, batch):
        imgs, _ = render_batch(EVAL_SEED, start, min(batch, num_images - start))
        x = to_model_input(imgs, vae.config.image_size)
        with autocast_for(dtype, "cpu"):
            idx = vae.img_to_indices(x)
            rec = vae.indices_to_img(idx)
        scores.append(psnr(rec.float(), x))
        for si, i in enumerate(idx):
            used[si].update(i.unique().tolist())
    vae.train(was_training)
    return {
        "psnr": float(torch.cat(scores).mean()),
        "num_images": num_images,
        "codes_used_per_scale": [len(u) for u in used],
        "codes_used_total": len(set().union(*used)),
    }


def train_tokenizer(config: TokenizerTrainConfig, run_dir: str, progress: bool = True) -> VQVAE:
    """Resumable training loop; returns the trained tokenizer (fp32, eval mode)."""
    spec = get_spec(config.model)
    run = RunDir(run_dir)
    torch.manual_seed(config.seed)
    vae = VQVAE(spec.vae).to(config.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step, elapsed = run.resume(vae, opt, gen)
    vae.train()
    bar = tqdm(total=config.steps, initial=step, desc="tokenizer", disable=not progress, dynamic_ncols=True)
    t_last = time.time()
    while step < config.steps:
        imgs, _ = render_batch(TRAIN_SEED, step * config.batch_size, config.batch_size)
        x = to_model_input(imgs, spec.vae.image_size).to(config.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
        with autocast_for(config.dtype, config.device):
            latent = vae.encode_latent(x)
            f_hat, vq_loss, _ = vae.quantize(latent)
            rec = vae.decoder(vae.post_quant_conv(f_hat)).float()
        rec_loss = F.mse_loss(rec, x) + config.l1_weight * F.l1_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 2.0)
        opt.step()
        step += 1
        restarted = 0
        if config.restart_every and step % config.restart_every == 0 and step < 0.9 * config.steps:
            restarted = restart_dead_codes(vae, latent.detach(), config.dead_threshold, gen)
        now = time.time()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            with torch.no_grad():
                p = float(psnr(rec.detach().clamp(-1, 1), x).mean())
                usage = (vae.quantize.ema_vocab_hit_SV > 0.1 / spec.vae.vocab_size).sum(1).tolist()
            rec_ = {"step": step, "loss": loss.item(), "rec": rec_loss.item(), "vq": vq_loss.item(),
                    "psnr": p, "codes_used_per_scale": usage, "restarted": restarted,
                    "img_per_s": step * config.batch_size / max(elapsed, 1e-9), "elapsed_s": elapsed}
            run.log(rec_)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.1f}", codes=max(usage),
                            ips=f"{rec_['img_per_s']:.0f}")
        if step % config.save_every == 0 or step == config.steps:
            run.checkpoint(vae, opt, gen, step, elapsed, asdict(config))
    bar.close()
    vae.eval()
    return vae


def export_tokenizer(vae: VQVAE, path: str) -> None:
    save_safetensors(vae, path, half=True)
