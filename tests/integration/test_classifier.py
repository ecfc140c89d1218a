"""Tests for the shape classifier: shipped weights are usable, and training code runs.

The shipped checkpoint is the referee for generated images, so it must load strictly and be clearly
better than chance (10%) on held-out data; >= 90% on 300 images is far outside what chance allows.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.classifier import (
    DEFAULT_WEIGHTS,
    ShapeClassifier,
    evaluate_classifier,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from training.shapes import EVAL_SEED, render_batch, to_tensor


def test_shipped_classifier_loads_strictly_and_is_accurate() -> None:
    model = load_classifier(DEFAULT_WEIGHTS)
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 300_000
    acc = evaluate_classifier(model, seed=EVAL_SEED, n=300)
    assert acc >= 0.90, acc


def test_predictions_do_not_depend_on_batch_composition() -> None:
    # GroupNorm (not BatchNorm): a sample's prediction is the same alone or inside a batch.
    model = load_classifier(DEFAULT_WEIGHTS)
    images, _ = render_batch(EVAL_SEED, 0, 8)
    x = to_tensor(images)
    with torch.inference_mode():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-4)
    assert predict(model, x, batch_size=3).shape == (8,)


def test_training_smoke_and_save_load_roundtrip(tmp_path) -> None:
    path = tmp_path / "clf.safetensors"
    model = train_classifier(steps=3, batch_size=8, lr=1e-3, seed=0, out_path=path, progress=False)
    assert isinstance(model, ShapeClassifier) and not model.training
    images, labels = render_batch(0, 0, 8)
    x = to_tensor(images)
    with torch.inference_mode():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    assert logits.shape == (8, 10)
    assert math.isfinite(loss.item())

    reloaded = load_classifier(path)
    with torch.inference_mode():
        # fp16 storage: close, not bit-identical.
        torch.testing.assert_close(reloaded(x), logits, rtol=2e-2, atol=2e-2)
    assert set(reloaded.state_dict()) == set(model.state_dict())


def test_load_rejects_foreign_checkpoint(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"arch": "SomethingElse"})
    with pytest.raises(ValueError):
        load_classifier(path)


def test_save_load_small_config(tmp_path) -> None:
    model = ShapeClassifier(widths=(8, 16), groups=4).eval()
    path = tmp_path / "small.safetensors"
    save_classifier(model, path)
    reloaded = load_classifier(path)
    assert reloaded.widths == (8, 16) and reloaded.groups == 4
