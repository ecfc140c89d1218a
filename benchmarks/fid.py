"""FID on the shape classifier's features (not Inception), through torchmetrics.

``FrechetInceptionDistance`` accepts any ``nn.Module`` as ``feature=``; :class:`ClassifierFeatures`
wraps the shipped shape classifier (:mod:`training.classifier`) and returns its penultimate
activations: the globally average-pooled output of the last conv stage, the vector the linear head
reads (160-d for the shipped weights). It carries a ``num_features`` attribute so torchmetrics does
not probe it with a dummy image, and it takes the images as ``uint8`` ``[N, 3, H, W]`` in [0, 255]
(torchmetrics' ``normalize=False`` convention; float input in [0, 1] is accepted too). Nothing is
downloaded: the Inception weights are never constructed.

The numbers are therefore FIDs in the classifier's feature space, comparable with each other but
not with Inception FIDs in papers. The covariances are estimated from the images given; with fewer
images than features (160) they are rank deficient and the FID is biased upwards.

FID is one number per image set, so it has no per-seed t-interval like PSNR. Two sets generated from
the same seeds are compared with a paired bootstrap instead (:func:`fid_bootstrap`,
:func:`paired_fid_delta`): the seeds are resampled with replacement, the same resample for the
reference set and both policies, and the FID difference is recomputed on each; the percentile
interval of those differences says whether the seeds can tell the two policies apart. The resampled
FIDs use the same formula as torchmetrics (:func:`frechet_distance`, float64); a resample repeats
images, so its FIDs are biased upwards, and only their differences are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierFeatures", "FeatureFID", "bootstrap_indices", "feature_fid", "fid_bootstrap",
           "frechet_distance", "paired_fid_delta", "to_uint8_nchw"]


class ClassifierFeatures(nn.Module):
    """Penultimate activations ``[N, d]`` of a :class:`~training.classifier.ShapeClassifier`."""

    def __init__(self, classifier: nn.Module | None = None) -> None:
        super().__init__()
        if classifier is None:
            from training.classifier import load_classifier

            classifier = load_classifier()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = int(self.classifier.head.in_features)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        x = imgs.to(device)
        # The classifier reads [-1, 1]: uint8 [0, 255] (torchmetrics' normalize=False) or float [0, 1].
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float() * 2 - 1
        with torch.no_grad():
            return self.classifier.features(x).mean(dim=(2, 3))


def to_uint8_nchw(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images (a list or an ``[N, H, W, 3]`` array) -> uint8 ``[N, 3, H, W]``."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


class FeatureFID:
    """FID of image sets against one fixed reference set (e.g. the full-cache images).

    The reference ("real") statistics are accumulated once (``reset_real_features=False``); each call
    resets only the "fake" side."""

    def __init__(self, reference: Sequence[np.ndarray] | np.ndarray, extractor: nn.Module | None = None,
                 batch_size: int = 256) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extractor = extractor if extractor is not None else ClassifierFeatures()
        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False, normalize=False)
        self.num_reference = self._update(reference, real=True)
        self.reference_features = self.features(reference)

    @property
    def num_features(self) -> int:
        return int(self.extractor.num_features)

    def _update(self, images: Sequence[np.ndarray] | np.ndarray, real: bool) -> int:
        x = to_uint8_nchw(images)
        if x.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {x.shape[0]}")
        for i in range(0, x.shape[0], self.batch_size):
            self.metric.update(x[i : i + self.batch_size], real=real)
        return int(x.shape[0])

    def __call__(self, images: Sequence[np.ndarray] | np.ndarray) -> float:
        self.metric.reset()
        self._update(images, real=False)
        return float(self.metric.compute())

    def features(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Per-image features ``[N, d]`` (float64), in image order: what the bootstrap resamples."""
        x = to_uint8_nchw(images)
        out = [self.extractor(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out).double().numpy()


def feature_fid(a: Sequence[np.ndarray] | np.ndarray, b: Sequence[np.ndarray] | np.ndarray,
                extractor: nn.Module | None = None) -> float:
    """FID between two sets of uint8 ``[H, W, 3]`` images in the classifier's feature space."""
    return FeatureFID(a, extractor)(b)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows ``a`` ``[N, d]`` and ``b`` ``[M, d]``:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 sum sqrt(eig(S_a S_b))`` with unbiased (n - 1)
    covariances in float64, the formula torchmetrics' FID evaluates on its accumulated statistics."""
    ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[1] != tb.shape[1] or min(ta.shape[0], tb.shape[0]) < 2:
        raise ValueError(f"frechet_distance: expected [N>=2, d] and [M>=2, d] features, got {tuple(ta.shape)} "
                         f"and {tuple(tb.shape)}")
    mu_a, mu_b = ta.mean(0), tb.mean(0)
    sa, sb = torch.cov(ta.T), torch.cov(tb.T)
    covmean = torch.linalg.eigvals(sa @ sb).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + sa.trace() + sb.trace() - 2 * covmean)


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` seed indices drawn with replacement (one fixed, seeded draw: every policy
    of a report is resampled the same way, so their FIDs stay paired)."""
    if n < 2 or resamples < 1:
        raise ValueError(f"bootstrap_indices: need n >= 2 and resamples >= 1, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def fid_bootstrap(reference: np.ndarray, features: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """FID of ``features`` against ``reference`` (both ``[n, d]``, row i from seed i) on every resample
    of seeds in ``indices`` (``[B, n]``): ``[B]`` values."""
    if reference.shape != features.shape:
        raise ValueError(f"fid_bootstrap: the sets must hold the same seeds, got {reference.shape} and "
                         f"{features.shape}")
    return np.array([frechet_distance(reference[ix], features[ix]) for ix in indices])


def paired_fid_delta(point: float, boot: np.ndarray, boot_ref: np.ndarray, confidence: float = 0.95) -> dict:
    """The FID difference ``point`` (policy - reference policy, on all seeds) with the percentile
    interval of the paired bootstrap differences ``boot - boot_ref`` (same resamples)."""
    diff = np.asarray(boot, dtype=np.float64) - np.asarray(boot_ref, dtype=np.float64)
    if diff.ndim != 1 or diff.size < 2:
        raise ValueError(f"paired_fid_delta: need >= 2 paired bootstrap values, got shape {diff.shape}")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diff, [tail, 100 - tail])
    return {"mean": float(point), "low": float(low), "high": float(high), "resamples": int(diff.size),
            "confidence": confidence, "method": "paired percentile bootstrap over seeds"}
