"""Model evaluation: class accuracy of samples (scored by the shape classifier), where samples
lose their class (teacher-forced prefixes), and sample grids. The attention report, which runs
the model with an attention hook like calibration does, lives beside it in ``engine/calibrate.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.models.registry import LoadedModel
from engine.request import ImageRequest


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
    reqs = [ImageRequest(class_label=c, seed=seed + i, request_id=f"c{c}-{i}", cfg=cfg, top_k=top_k,
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
        reqs = [ImageRequest(class_label=int(labels[j]), seed=start + j, request_id=str(j),
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
    reqs = [ImageRequest(class_label=c, seed=seed + i, request_id=f"{c}-{i}")
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
