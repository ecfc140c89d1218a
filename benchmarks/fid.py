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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierFeatures", "FeatureFID", "feature_fid", "to_uint8_nchw"]


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


def feature_fid(a: Sequence[np.ndarray] | np.ndarray, b: Sequence[np.ndarray] | np.ndarray,
                extractor: nn.Module | None = None) -> float:
    """FID between two sets of uint8 ``[H, W, 3]`` images in the classifier's feature space."""
    return FeatureFID(a, extractor)(b)
