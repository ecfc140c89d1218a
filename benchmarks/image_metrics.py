"""Image comparison metrics of the fidelity harness: PSNR, SSIM (torchmetrics), token agreement,
and class correctness by the shape classifier."""

from __future__ import annotations

import numpy as np
import torch

from engine.request import ImageResult

PSNR_CAP = 100.0  # dB reported for identical images (PSNR is infinite there)


# --------------------------------------------------------------------------- metrics
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (``PSNR_CAP`` when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def _nchw01(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0


def ssim_batch(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Per-image SSIM of two stacks of uint8 ``[H, W, 3]`` images (``SSIM_CONVENTION``)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _nchw01(np.stack(list(a))), _nchw01(np.stack(list(b)))
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) <= 5:
        raise ValueError(f"ssim: images must be larger than 5 px (the window's reflect padding), got {x.shape}")
    out = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return out.numpy().astype(np.float64)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 ``[H, W, 3]`` images (``SSIM_CONVENTION``; 1 when identical)."""
    return float(ssim_batch([a], [b])[0])


def token_agreement(a: list[int], b: list[int], lengths: list[int]) -> list[float]:
    """Fraction of equal tokens per scale (tokens are flattened coarse to fine)."""
    out, start = [], 0
    ta, tb = np.asarray(a), np.asarray(b)
    for n in lengths:
        out.append(float(np.mean(ta[start : start + n] == tb[start : start + n])))
        start += n
    return out


def class_correct(results: list[ImageResult], classifier: torch.nn.Module | None = None) -> np.ndarray:
    """Per-request 0/1: the shape classifier sees the requested class in the image."""
    from training.classifier import load_classifier, predict

    x = torch.stack([torch.from_numpy(r.image) for r in results]).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = predict(classifier if classifier is not None else load_classifier(), x)
    labels = torch.tensor([r.class_label for r in results])
    return (pred == labels).numpy().astype(np.float64)


def class_accuracy(results: list[ImageResult], classifier: torch.nn.Module | None = None) -> float:
    return float(class_correct(results, classifier).mean())


