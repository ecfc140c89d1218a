"""Model evaluation: tokenizer PSNR, class accuracy of samples, and the attention report.

The attention report is what the compression work starts from: for every (scale, layer) it
gives the share of attention mass the current scale's queries put on their own scale (vs all
earlier scales) and the attention entropy, averaged over heads, queries and requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models.registry import LoadedModel
from engine.precision import autocast_for
from engine.reference import ContiguousKVCache
from engine.requests import GenerationRequest
from engine.sampling import make_generator, sample_scale


@dataclass
class AttentionStats:
    """Accumulates per-(scale, layer) attention statistics during generation."""

    num_scales: int
    num_layers: int

    def __post_init__(self) -> None:
        self.current_mass = torch.zeros(self.num_scales, self.num_layers, dtype=torch.float64)
        self.entropy = torch.zeros(self.num_scales, self.num_layers, dtype=torch.float64)
        self.count = torch.zeros(self.num_scales, dtype=torch.float64)

    def report(self) -> dict:
        n = self.count.clamp_min(1)[:, None]
        return {
            "current_scale_mass": (self.current_mass / n).tolist(),
            "entropy_nats": (self.entropy / n).tolist(),
        }


class _RecordingCache(ContiguousKVCache):
    """The reference cache, also recording attention statistics of the conditional branch."""

    def __init__(self, model: LoadedModel, stats: AttentionStats, batch: int, max_queries: int) -> None:
        super().__init__(model)
        self.stats, self.batch, self.max_queries = stats, batch, max_queries
        self.scale_index = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = super().attend(layer, q, k, v)
        keys = self.k[layer][: self.batch].float()
        lq = q.shape[2]
        step = max(1, lq // self.max_queries)
        qs = q[: self.batch, :, ::step].float()
        probs = (qs @ keys.transpose(-1, -2) * self.scales[layer]).softmax(-1)  # [B, H, q, Lcum]
        hist = keys.shape[2] - lq
        cur = probs[..., hist:].sum(-1)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        si = self.scale_index
        self.stats.current_mass[si, layer] += float(cur.mean()) * self.batch
        self.stats.entropy[si, layer] += float(ent.mean()) * self.batch
        if layer == len(self.scales) - 1:
            self.stats.count[si] += self.batch
        return out


@torch.no_grad()
def attention_report(model: LoadedModel, requests: list[GenerationRequest], max_queries: int = 64,
                     dtype: str = "float32") -> dict:
    """Generate ``requests`` with the reference loop, recording attention per (scale, layer)."""
    var, vae, spec = model.var, model.vae, model.spec
    device = next(var.parameters()).device
    b, num_scales = len(requests), spec.var.num_scales
    stats = AttentionStats(num_scales, spec.var.depth)
    cache = _RecordingCache(model, stats, b, max_queries)
    labels = torch.tensor([r.class_label for r in requests] + [spec.var.num_classes] * b, device=device)
    gens = [make_generator(r.seed) for r in requests]
    f_hat = torch.zeros(b, spec.vae.z_channels, spec.vae.patch_nums[-1], spec.vae.patch_nums[-1], device=device)
    nxt = None
    with autocast_for(dtype, device):
        cond = var.condition(labels)
        for si in range(num_scales):
            cache.scale_index = si
            x = var.embed_scale(si, cond, None if si == 0 else torch.cat((nxt, nxt)))
            logits = var.logits(var.run_blocks(x, cond, cache.attend), cond)
            idx = sample_scale(logits[:b], logits[b:], requests, gens, si, num_scales).to(device)
            f_hat, nxt = vae.quantize.advance(f_hat, si, idx)
    rep = stats.report()
    rep.update({"model": spec.name, "patch_nums": list(spec.var.patch_nums), "depth": spec.var.depth,
                "num_requests": b, "max_queries_per_scale": max_queries})
    mass = torch.tensor(rep["current_scale_mass"])[1:]  # scale 0 has no history
    rep["summary"] = {
        "min_current_mass": float(mass.min()),
        "max_current_mass": float(mass.max()),
        # scale index -> layers putting more than half of their attention on the current scale
        "layers_mostly_current": {str(s + 1): [la for la in range(spec.var.depth) if mass[s, la] > 0.5]
                                  for s in range(mass.shape[0])},
    }
    return rep


def plot_attention_report(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = torch.tensor(report["current_scale_mass"])
    ent = torch.tensor(report["entropy_nats"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data, title, cmap in ((axes[0], mass, "attention mass on the current scale", "viridis"),
                                  (axes[1], ent, "attention entropy (nats)", "magma")):
        im = ax.imshow(data.T.numpy(), aspect="auto", origin="lower", cmap=cmap)
        ax.set_xlabel("scale (side)")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(report["patch_nums"])), [str(p) for p in report["patch_nums"]])
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{report['model']}: attention per (scale, layer), {report['num_requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def sample_accuracy(model: LoadedModel, per_class: int = 100, seed: int = 0, engine_config=None,
                    progress: bool = True, cfg: float | None = None, top_k: int | None = None,
                    top_p: float | None = None) -> dict:
    """Generate ``per_class`` images of every class with the engine (the model's default sampling
    settings unless given) and score them with the shipped shape classifier."""
    from tqdm import tqdm

    from engine.api import EngineConfig, ImageEngine
    from training.classifier import load_classifier, predict

    spec = model.spec
    engine = ImageEngine(model, engine_config or EngineConfig())
    reqs = [GenerationRequest(class_label=c, seed=seed + i, request_id=f"c{c}-{i}", cfg=cfg, top_k=top_k,
                              top_p=top_p)
            for c in range(spec.var.num_classes) for i in range(per_class)]
    images, labels = [], []
    bar = tqdm(total=len(reqs), desc="sampling", disable=not progress)
    for r in engine.generate_stream(reqs):
        if not r.ok:
            raise RuntimeError(f"generation failed: {r.error}")
        images.append(torch.from_numpy(r.image))
        labels.append(r.class_label)
        bar.update(1)
    bar.close()
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = predict(load_classifier(), x)
    y = torch.tensor(labels)
    per = [float((pred[y == c] == c).float().mean()) for c in range(spec.var.num_classes)]
    return {"accuracy": float((pred == y).float().mean()), "per_class": per, "num_images": len(y),
            "cfg": spec.default_cfg if cfg is None else cfg, "top_k": spec.default_top_k if top_k is None else top_k,
            "top_p": spec.default_top_p if top_p is None else top_p}


@torch.no_grad()
def forced_prefix_accuracy(model: LoadedModel, forced_scales: list[int], per_class: int = 20, start: int = 0,
                           batch: int = 100, dtype: str = "float32", progress: bool = True) -> dict:
    """Where do samples lose their class? For each k in ``forced_scales``, the first k scales of
    held-out images (split ``EVAL_SEED``, indices ``start``..) are teacher-forced from their real
    tokens and the remaining scales are sampled with the image's class and the model's default
    sampling settings; the shipped classifier scores the results. k = 0 is plain sampling; k = all
    scales is the tokenizer's reconstruction. Accuracy that jumps between k and k' says the scales
    in between are where the model goes wrong."""
    from tqdm import tqdm

    from engine.reference import generate_reference
    from training.classifier import load_classifier, predict
    from training.shapes import EVAL_SEED, render_batch, to_tensor

    spec = model.spec
    n_scales, n_cls = spec.var.num_scales, spec.var.num_classes
    forced_scales = list(dict.fromkeys(forced_scales))  # a repeated k is one run
    for k in forced_scales:
        if not 0 <= k <= n_scales:
            raise ValueError(f"forced_scales: each must be in [0, {n_scales}], got {k}")
    if spec.vae.image_size != 64:
        raise ValueError(f"model {spec.name!r}: the shape classifier needs 64x64 images, got {spec.vae.image_size}")
    n = per_class * n_cls  # labels are index % num_classes, so this window is balanced
    imgs, labels = render_batch(EVAL_SEED, start, n)
    labels = torch.as_tensor(labels)
    classifier = load_classifier()
    images: dict[int, list[torch.Tensor]] = {k: [] for k in forced_scales}
    bar = tqdm(total=n * len(forced_scales), desc="forced prefix", disable=not progress)
    for i in range(0, n, batch):
        x = to_tensor(imgs[i : i + batch])
        real = model.vae.img_to_indices(x.to(next(model.vae.parameters()).device))  # once for every k
        reqs = [GenerationRequest(class_label=int(labels[j]), seed=start + j, request_id=str(j),
                                  cfg=spec.default_cfg, top_k=spec.default_top_k, top_p=spec.default_top_p)
                for j in range(i, i + x.shape[0])]
        for k in forced_scales:
            res = generate_reference(model, reqs, dtype=dtype, forced_tokens=real[:k])
            images[k] += [torch.from_numpy(r.image) for r in res]
            bar.update(len(reqs))
    bar.close()
    out: dict[str, dict] = {}
    for k in forced_scales:
        x = torch.stack(images[k]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = predict(classifier, x)
        out[str(k)] = {"accuracy": float((pred == labels).float().mean()),
                       "per_class": [float((pred[labels == c] == c).float().mean()) for c in range(n_cls)]}
    return {"forced_scales": out, "num_images": n, "cfg": spec.default_cfg, "top_k": spec.default_top_k,
            "top_p": spec.default_top_p}


@torch.no_grad()
def sample_grid(model: LoadedModel, path: str | Path, per_class: int = 8, seed: int = 0, engine_config=None) -> None:
    """A PNG grid: one row per class, ``per_class`` samples each (seeds seed..seed+per_class-1)."""
    import numpy as np
    from PIL import Image

    from engine.api import EngineConfig, ImageEngine

    n_cls = model.spec.var.num_classes
    reqs = [GenerationRequest(class_label=c, seed=seed + i, request_id=f"{c}-{i}")
            for c in range(n_cls) for i in range(per_class)]
    results = ImageEngine(model, engine_config or EngineConfig()).generate(reqs)
    tiles = [r.image for r in results]
    h, w, _ = tiles[0].shape
    pad = 2
    grid = np.full((n_cls * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, img in enumerate(tiles):
        r, c = divmod(k, per_class)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def save_json(obj: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))
