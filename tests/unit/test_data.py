"""Tests for the procedural shapes dataset: determinism, balance, ranges, and class coverage.

Determinism matters because train/eval splits are defined only by ``(seed, index)``: if pixels depended
on batch layout or global RNG state, "held-out" samples could leak into training or change between runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.shapes import (
    CLASS_NAMES,
    EVAL_SEED,
    NUM_CLASSES,
    TRAIN_SEED,
    ShapesDataset,
    render,
    render_batch,
    sample_params,
    to_tensor,
    to_uint8,
)


def test_class_names() -> None:
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert len(set(CLASS_NAMES)) == 10
    assert CLASS_NAMES[0] == "disk-solid" and CLASS_NAMES[1] == "disk-striped"
    assert CLASS_NAMES[9] == "cross-striped"
    assert TRAIN_SEED == 0 and EVAL_SEED == 1


def test_same_seed_index_is_identical() -> None:
    a, la = render(0, 123)
    b, lb = render(0, 123)
    assert la == lb
    np.testing.assert_array_equal(a, b)


def test_batch_matches_single_renders() -> None:
    # Batching groups samples by shape and chunks large batches; pixels must not depend on that.
    images, labels = render_batch(3, 95, 80)
    for k in (0, 1, 7, 40, 64, 79):
        img, lab = render(3, 95 + k)
        assert lab == labels[k]
        np.testing.assert_array_equal(images[k], img)


def test_global_rng_state_does_not_matter() -> None:
    np.random.seed(1)
    torch.manual_seed(1)
    a, _ = render_batch(0, 0, 10)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.rand(100)
    b, _ = render_batch(0, 0, 10)
    np.testing.assert_array_equal(a, b)


def test_different_seeds_and_indices_differ() -> None:
    a, la = render_batch(TRAIN_SEED, 0, 20)
    b, lb = render_batch(EVAL_SEED, 0, 20)
    np.testing.assert_array_equal(la, lb)  # labels are index % 10 in every split
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(20, -1).mean(axis=1)
    assert (diff > 5).all(), diff
    c, _ = render_batch(TRAIN_SEED, 10, 10)
    assert not np.array_equal(a[:10], c)  # same labels, different indices -> different images


def test_labels_balanced() -> None:
    _, labels = render_batch(0, 0, 1000)
    np.testing.assert_array_equal(labels, np.arange(1000) % 10)
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    _, labels = render_batch(5, 37, 30)  # any 10 consecutive indices hold each class once
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10


def test_shape_dtype_and_range() -> None:
    images, labels = render_batch(0, 0, 20)
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert images.std() > 20  # not a blank canvas

    ds = ShapesDataset(TRAIN_SEED, length=25, start=5)
    assert len(ds) == 25
    x, y = ds[0]
    assert isinstance(y, int) and y == 5
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    xb, yb = ds.get_batch(0, 4)
    assert xb.shape == (4, 3, 64, 64) and yb.tolist() == [5, 6, 7, 8]
    torch.testing.assert_close(xb[0], x)
    assert ds[-1][1] == (5 + 24) % 10
    with pytest.raises(IndexError):
        ds[25]


def test_tensor_roundtrip() -> None:
    images, _ = render_batch(0, 0, 4)
    x = to_tensor(images)
    assert x.shape == (4, 3, 64, 64)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8(x), images)


def test_all_classes_render_with_visible_object() -> None:
    """Every class renders, and the object is a large, well-contrasted region against the background."""
    images, labels = render_batch(2, 0, 30)
    assert set(labels.tolist()) == set(range(10))
    for k in range(30):
        p, _ = sample_params(2, k)
        assert p.shape * 2 + p.texture == labels[k]
        img = images[k].astype(np.float32) / 255.0
        obj = np.asarray(p.obj_rgb, dtype=np.float32)
        # Pixels close to the object colour (striped objects: at least their light stripes).
        close = np.abs(img - obj).max(axis=-1) < 0.08
        frac = close.mean()
        assert 0.02 < frac < 0.6, (k, CLASS_NAMES[labels[k]], frac)
        ys, xs = np.nonzero(close)
        # The object sits around its sampled centre.
        assert abs(xs.mean() + 0.5 - p.cx) < 6 and abs(ys.mean() + 0.5 - p.cy) < 6


def test_striped_differs_from_solid_texture() -> None:
    """Striped objects contain dark stripe pixels of the object's hue; solid objects do not."""
    images, labels = render_batch(4, 0, 40)
    for k in range(40):
        p, _ = sample_params(4, k)
        img = images[k].astype(np.float32) / 255.0
        dark = np.asarray(p.obj_rgb, dtype=np.float32) * 0.35
        n_dark = int((np.abs(img - dark).max(axis=-1) < 0.06).sum())
        if p.texture == 1:
            assert n_dark > 20, (k, n_dark)
        else:
            assert n_dark < 20, (k, n_dark)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        render(-1, 0)
    with pytest.raises(ValueError):
        render_batch(0, 0, -1)
    images, labels = render_batch(0, 0, 0)
    assert images.shape == (0, 64, 64, 3) and labels.shape == (0,)
