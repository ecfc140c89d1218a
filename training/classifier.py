"""Small CNN that recognises the 10 synthetic shape classes; the referee for generated images.

Why: a class-conditional generator is only useful if an image sampled for class ``c`` *looks like*
class ``c``. This classifier, trained on the procedural dataset (:mod:`training.shapes`), turns that
into a number ("class accuracy of generated samples") that engine tests and benchmarks can track, e.g.
to check that a KV-cache optimisation did not silently change what the VAR model draws.

It is deliberately tiny (~0.2 M params, one conv per stage, GroupNorm) so it trains to >98% held-out
accuracy in minutes on one CPU core and scores batches quickly. GroupNorm instead of BatchNorm keeps
predictions independent of batch composition and of train/eval running statistics, which matters
when scoring small or oddly distributed batches of generated images.

Train / refresh the shipped weights (uses one CPU thread)::

    python -m training.classifier --steps 2000 --out training/weights/classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from training.shapes import EVAL_SEED, IMAGE_SIZE, NUM_CLASSES, TRAIN_SEED, render_batch, to_tensor

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
DEFAULT_WIDTHS: tuple[int, ...] = (32, 64, 96, 160)
_ARCH = "ShapeClassifier"


class ShapeClassifier(nn.Module):
    """Conv stages (3x3 stride-2 conv -> GroupNorm -> SiLU) + global average pool + linear.

    Input: images in [-1, 1], float [B, 3, 64, 64] (what :func:`training.shapes.to_tensor` yields).
    Output: logits [B, num_classes]. Four stages take 64 px down to 4 px; each final feature sees a
    31 px window, half the image, so outlines (not just local texture) are visible. Strided convs
    instead of conv + max-pool: on CPU the full-resolution norm/activation/pool passes, not the convs,
    dominated step time (conv + pool was 4.7x slower per training step).
    """

    def __init__(
        self, widths: Sequence[int] = DEFAULT_WIDTHS, num_classes: int = NUM_CLASSES, groups: int = 8
    ) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.num_classes = int(num_classes)
        self.groups = int(groups)
        layers: list[nn.Module] = []
        cin = 3
        for w in self.widths:
            layers += [
                nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False),  # bias is redundant before a norm
                nn.GroupNorm(math.gcd(self.groups, w), w),
                nn.SiLU(),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def config(self) -> dict[str, object]:
        """Constructor arguments; stored in checkpoint metadata so loading needs no side channel."""
        return {"widths": list(self.widths), "num_classes": self.num_classes, "groups": self.groups}


def save_classifier(model: ShapeClassifier, path: str | Path) -> None:
    """Save weights as fp16 safetensors (halves the file; fp16 rounding does not move accuracy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {"arch": _ARCH, "config": json.dumps(model.config())}
    save_file(tensors, str(path), metadata=metadata)


def load_classifier(
    path: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu"
) -> ShapeClassifier:
    """Load a checkpoint written by :func:`save_classifier`; strict, fp32, in eval mode."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("arch") != _ARCH:
            raise ValueError(f"{path} is not a {_ARCH} checkpoint (arch={meta.get('arch')!r})")
        cfg = json.loads(meta["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    model = ShapeClassifier(widths=cfg["widths"], num_classes=cfg["num_classes"], groups=cfg["groups"])
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Class predictions (int64 [N]) for images in [-1, 1] [N,3,64,64], evaluated in chunks."""
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device, torch.float32)).argmax(dim=1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def evaluate_classifier(
    model: nn.Module, seed: int = EVAL_SEED, n: int = 1000, batch_size: int = 250
) -> float:
    """Top-1 accuracy on samples ``0 .. n-1`` of split ``seed`` (held-out split by default)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, n, batch_size):
        images, labels = render_batch(seed, start, min(batch_size, n - start))
        correct += int((predict(model, to_tensor(images)) == torch.from_numpy(labels)).sum())
    model.train(was_training)
    return correct / max(n, 1)


def train_classifier(
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    out_path: str | Path | None = None,
    progress: bool = True,
    *,
    data_seed: int = TRAIN_SEED,
    weight_decay: float = 0.02,
    warmup: int = 100,
    bf16: bool = False,
) -> ShapeClassifier:
    """Train a fresh :class:`ShapeClassifier` on freshly rendered data and (optionally) save it.

    ``seed`` seeds the weight init; the data always come from split ``data_seed`` (train split), step
    ``s`` using samples ``[s*batch_size, (s+1)*batch_size)``, so no image is seen twice and a run is
    reproducible. AdamW with linear warm-up then cosine decay to 0; weight decay only on conv/linear
    weights (decaying norm gains and biases only fights the normalisation). ``bf16`` enables CPU
    autocast, which helps on CPUs with native bf16 support. ``out_path=None`` skips saving, so a library
    call never overwrites the shipped weights by accident.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    # Seed only the init, on a forked RNG, so callers' global torch RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = min(warmup, max(steps // 10, 1))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    model.train()
    ema_loss, ema_acc = float("nan"), float("nan")
    bar = tqdm(range(steps), disable=not progress, desc="classifier", dynamic_ncols=True)
    for step in bar:
        images, labels = render_batch(data_seed, step * batch_size, batch_size)
        x, y = to_tensor(images), torch.from_numpy(labels)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
        a = 0.0 if math.isnan(ema_loss) else 0.95
        ema_loss = a * (0.0 if math.isnan(ema_loss) else ema_loss) + (1 - a) * loss.item()
        ema_acc = a * (0.0 if math.isnan(ema_acc) else ema_acc) + (1 - a) * acc
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", lr=f"{lr_at(step):.1e}")
    model.eval()
    if out_path is not None:
        save_classifier(model, out_path)
    return model


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shape classifier on the synthetic dataset.")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--bf16", action="store_true", help="CPU bf16 autocast")
    parser.add_argument("--eval-n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machines)")
    args = parser.parse_args(argv)
    # Only the CLI touches global threading; library callers keep whatever their process configured.
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = train_classifier(args.steps, args.batch_size, args.lr, args.seed, args.out, bf16=args.bf16)
    train_s = time.perf_counter() - t0
    acc = evaluate_classifier(model, seed=EVAL_SEED, n=args.eval_n)
    reloaded = evaluate_classifier(load_classifier(args.out), seed=EVAL_SEED, n=args.eval_n)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"params={n_params} steps={args.steps} batch={args.batch_size} train_time={train_s:.1f}s "
        f"heldout_acc(seed={EVAL_SEED}, n={args.eval_n})={acc:.4f} reloaded_fp16_acc={reloaded:.4f} "
        f"image_size={IMAGE_SIZE} -> {args.out}"
    )


if __name__ == "__main__":
    _main()
