"""Fidelity harness: SSIM (torchmetrics), FID on the classifier's features, paired deltas vs a reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")

from benchmarks.fidelity import FidelityConfig, format_table, run_fidelity, ssim, ssim_batch, write_outputs  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from memory.profile import ScaleProfile  # noqa: E402


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory, micro_model):
    cfg = micro_model.spec.var
    prof = ScaleProfile(model="var-micro", patch_nums=tuple(cfg.patch_nums), depth=cfg.depth,
                        drafters=((), (0,), (1,), (0,)))
    path = tmp_path_factory.mktemp("profile") / "scale_profile.json"
    prof.save(path)
    return str(path)


@pytest.fixture(scope="module")
def shapes():
    from training.shapes import render_batch

    images, _ = render_batch(123, 0, 48)
    return images  # uint8 [48, 64, 64, 3]


def _micro_cfg(profile_path, **kw) -> FidelityConfig:
    engine = EngineConfig(dtype="float32", block_size=4, window_size=4, kv_pool_bytes=1 << 20,
                          profile_path=profile_path)
    base = {"policies": ["full", "scalekv", "sliding", "h2o"], "budgets": [0.2, 0.5], "num": 4, "engine": engine}
    return FidelityConfig(**{**base, **kw})


# --------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    cfg = FidelityConfig()
    assert cfg.num >= 200 and cfg.budgets == [0.04, 0.1, 0.2]
    assert cfg.reference == "scalekv" and cfg.confidence == 0.95 and cfg.fid
    with pytest.raises(ValueError):
        FidelityConfig(reference="full")
    with pytest.raises(ValueError):
        FidelityConfig(confidence=1.0)
    assert cfg.fid_bootstrap == 1000
    with pytest.raises(ValueError, match="fid_bootstrap"):
        FidelityConfig(fid_bootstrap=-1)
    assert FidelityConfig(reference=None).reference is None
    # every engine knob reaches every run; only policy and budget change per run
    knobs = EngineConfig(dtype="float32", peak_limit=0.12, drafter_mode="fixed", score_queries="all", block_size=8)
    run = FidelityConfig(engine=knobs).engine_config("scalekv", 0.04)
    assert (run.policy, run.kv_budget) == ("scalekv", 0.04)
    assert (run.peak_limit, run.drafter_mode, run.score_queries, run.block_size) == (0.12, "fixed", "all", 8)


# --------------------------------------------------------------------------- SSIM
def test_ssim_torchmetrics_convention():
    from torchmetrics.functional.image import structural_similarity_index_measure

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    per = ssim_batch(a, b)
    assert per.shape == (3,) and np.all((per > 0) & (per < 1))
    assert [ssim(x, y) for x, y in zip(a, b)] == pytest.approx(list(per))
    assert ssim_batch(a, a) == pytest.approx(np.ones(3))
    assert ssim_batch(b, a) == pytest.approx(per)  # symmetric
    # the documented convention: torchmetrics' defaults on [0, 1] RGB
    t = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255
    u = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255
    ref = structural_similarity_index_measure(t, u, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                              data_range=1.0, reduction="none")
    assert per == pytest.approx(ref.numpy())
    with pytest.raises(ValueError):
        ssim_batch(a[:, :4, :4], b[:, :4, :4])


# --------------------------------------------------------------------------- FID
def test_classifier_features_are_the_penultimate_activations(shapes):
    from benchmarks.fid import ClassifierFeatures, to_uint8_nchw
    from training.classifier import load_classifier

    clf = load_classifier()
    ext = ClassifierFeatures(clf)
    x = to_uint8_nchw(shapes[:8])
    feats = ext(x)
    assert ext.num_features == clf.head.in_features == clf.widths[-1] == 160
    assert feats.shape == (8, ext.num_features) and feats.dtype == torch.float32
    with torch.no_grad():
        logits = clf(x.float() / 127.5 - 1)
    torch.testing.assert_close(clf.head(feats), logits)  # the head's input: penultimate
    torch.testing.assert_close(ext(x.float() / 255), feats)  # float [0, 1] input reads the same


def test_fid_on_classifier_features(shapes, monkeypatch):
    import urllib.request

    from benchmarks.fid import ClassifierFeatures, FeatureFID, feature_fid

    def no_download(*a, **k):
        raise AssertionError("FID must not download anything")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    fid = FeatureFID(shapes, ClassifierFeatures())
    assert fid.num_reference == 48 and fid.num_features == 160
    assert abs(fid(shapes)) < 1e-3  # a set against itself
    rng = np.random.default_rng(0)
    scores = []
    for sd in (4, 16, 48):
        noisy = np.clip(shapes.astype(float) + rng.normal(0, sd, shapes.shape), 0, 255).astype(np.uint8)
        scores.append(fid(noisy))
    assert 1e-3 < scores[0] < scores[1] < scores[2]
    assert feature_fid(shapes, shapes[::-1]) == pytest.approx(0, abs=1e-3)  # order does not matter
    with pytest.raises(ValueError):
        fid(shapes[:1])


def test_frechet_distance_is_torchmetrics_fid(shapes):
    """The bootstrap's FID formula gives torchmetrics' value on the same images' features."""
    from benchmarks.fid import ClassifierFeatures, FeatureFID, frechet_distance

    fid = FeatureFID(shapes, ClassifierFeatures())
    rng = np.random.default_rng(1)
    noisy = np.clip(shapes.astype(float) + rng.normal(0, 16, shapes.shape), 0, 255).astype(np.uint8)
    ref, feats = fid.reference_features, fid.features(noisy)
    assert ref.shape == feats.shape == (48, 160) and ref.dtype == np.float64
    assert frechet_distance(ref, feats) == pytest.approx(fid(noisy), rel=1e-4, abs=1e-6)
    assert frechet_distance(ref, ref) == pytest.approx(0, abs=1e-4)  # rank-deficient: float noise
    with pytest.raises(ValueError):
        frechet_distance(ref[:1], feats[:1])


def test_paired_fid_bootstrap_known_answers():
    """Synthetic features: a set equal to the reference policy's differs by exactly 0 on every
    resample; a set shifted far from the full-cache features is worse on every resample; the draw
    is seeded."""
    from benchmarks.fid import bootstrap_indices, fid_bootstrap, frechet_distance, paired_fid_delta

    rng = np.random.default_rng(0)
    full = rng.normal(size=(60, 4))
    near = full + rng.normal(scale=0.05, size=full.shape)
    far = full + rng.normal(scale=0.05, size=full.shape) + 2.0  # mean shift 2 in every dimension: FID ~ 16
    idx = bootstrap_indices(60, 200, seed=3)
    assert idx.shape == (200, 60) and np.array_equal(idx, bootstrap_indices(60, 200, seed=3))
    b_near, b_far = fid_bootstrap(full, near, idx), fid_bootstrap(full, far, idx)
    same = paired_fid_delta(0.0, b_near, b_near)
    assert same["mean"] == same["low"] == same["high"] == 0.0 and same["resamples"] == 200
    point = frechet_distance(full, near) - frechet_distance(full, far)
    d = paired_fid_delta(point, b_near, b_far, confidence=0.9)
    assert d["high"] < 0 and d["low"] <= d["mean"] <= d["high"]
    assert d["mean"] == pytest.approx(-16, abs=1.5)
    with pytest.raises(ValueError):
        fid_bootstrap(full, near[:10], idx)
    with pytest.raises(ValueError):
        paired_fid_delta(0.0, b_near[:1], b_far[:1])


# --------------------------------------------------------------------------- harness
def test_paired_deltas_and_outputs(micro_model, profile_path, tmp_path):
    cfg = _micro_cfg(profile_path)
    report, images = run_fidelity(micro_model, cfg, progress=False)
    assert report["reference"] == "scalekv" and report["confidence"] == 0.95
    assert report["full"]["fid"] is None and "class_accuracy" not in report["full"]  # var-micro: no classifier
    by = {(r["policy"], r["kv_budget"]): r for r in report["results"]}
    for (policy, budget), r in by.items():
        ref = by[("scalekv", budget)]
        assert len(r["psnr_per_seed"]) == len(r["ssim_per_seed"]) == cfg.num
        assert r["psnr"] == pytest.approx(np.mean(r["psnr_per_seed"]))
        d = r["delta_psnr"]
        assert d["n"] == cfg.num and d["confidence"] == 0.95
        assert d["mean"] == pytest.approx(r["psnr"] - ref["psnr"])
        assert r["delta_ssim"]["mean"] == pytest.approx(r["ssim"] - ref["ssim"])
        if d["low"] is not None:
            assert d["low"] <= d["mean"] <= d["high"]
        if policy == "scalekv":  # against itself: exactly zero, zero width
            assert d["mean"] == d["low"] == d["high"] == 0.0
    table = format_table(report)
    assert "ref" in table and "dPSNR" in table and "95% t-interval" in table and "SSIM: torchmetrics" in table
    out = tmp_path / "fid.json"
    write_outputs(report, images, cfg, str(out), None)

    def no_nan(x):
        raise ValueError(f"non-strict JSON constant {x}")

    rep = json.loads(out.read_text(), parse_constant=no_nan)
    assert rep["results"][0]["delta_psnr"]["n"] == cfg.num


def test_reference_not_run_gives_no_deltas(micro_model, profile_path):
    report, _ = run_fidelity(micro_model, _micro_cfg(profile_path, policies=["full", "sliding"], budgets=[0.5],
                                                     num=2), progress=False)
    assert report["reference"] is None and "scalekv" in report["reference_note"]
    assert report["results"][0]["delta_psnr"] is None
    assert "no paired deltas" in format_table(report)


def test_fid_and_classes_wired_in(micro_model, profile_path, monkeypatch):
    """The classifier path (FID column, class accuracy) on the micro model's 16 px images, pretending
    the classifier can judge them: checks the wiring, not the numbers."""
    import benchmarks.fidelity as fidelity

    monkeypatch.setattr(fidelity, "CLASSIFIER_MODELS", ("var-micro",))
    report, _ = run_fidelity(micro_model, _micro_cfg(profile_path, policies=["full", "scalekv", "h2o"],
                                                     budgets=[0.2], num=4, fid_bootstrap=30), progress=False)
    assert report["fid_features"] == 160
    assert abs(report["full"]["fid"]) < 1e-3
    by = {r["policy"]: r for r in report["results"]}
    for r in report["results"]:
        assert math.isfinite(r["fid"]) and r["fid"] > -1e-3
        assert 0 <= r["class_accuracy"] <= 1 and len(r["class_correct_per_seed"]) == 4
        assert "delta_class_accuracy" in r
        d = r["delta_fid"]
        assert d["resamples"] == 30 and d["mean"] == pytest.approx(r["fid"] - by["scalekv"]["fid"])
        assert d["low"] <= d["high"]
    ref = by["scalekv"]["delta_fid"]
    assert ref["mean"] == ref["low"] == ref["high"] == 0.0  # against itself, on every resample
    assert "30 paired bootstrap" in report["conventions"]["delta_fid"]
    table = format_table(report)
    assert "FID" in table and "NOT Inception" in table and "rank-deficient" in table and " acc" in table
    assert "dFID [CI]" in table
    off, _ = run_fidelity(micro_model, _micro_cfg(profile_path, policies=["full", "scalekv", "h2o"],
                                                  budgets=[0.2], num=4, fid_bootstrap=0), progress=False)
    assert "delta_fid" not in off["results"][0] and "dFID" not in format_table(off)


def test_classifier_models_are_the_shapes_models():
    """FID and class accuracy are computed for every model trained on the shapes dataset (var-deep as
    well as var-tiny, whose images are the same 64 px classes) and for no other."""
    from benchmarks.fidelity import CLASSIFIER_MODELS
    from engine.models.catalog import MODELS
    from training.shapes import IMAGE_SIZE, NUM_CLASSES

    assert {"var-tiny", "var-deep"} <= set(CLASSIFIER_MODELS)
    assert "var-d16" not in CLASSIFIER_MODELS and "var-micro" not in CLASSIFIER_MODELS
    for name in CLASSIFIER_MODELS:
        spec = MODELS[name]
        assert spec.var.num_classes == NUM_CLASSES and spec.vae.image_size == IMAGE_SIZE


def test_policy_variants_pairs_every_variant_with_the_baseline(micro_model, profile_path):
    """The variants benchmark on the micro model with an explicit profile (as var-deep's candidate is
    run): the baseline's paired difference to itself is exactly 0, every variant's KV is a fraction of
    full's, and the weights' source is recorded."""
    from benchmarks.policy_variants import run_variants

    base = EngineConfig(dtype="float32", block_size=4, window_size=4, kv_pool_bytes=1 << 20,
                        profile_path=profile_path)
    report = run_variants(micro_model, ["scalekv", "scalekv-fixed", "snapkv-allq"], 0.2, 3, 0, "scalekv", base)
    rows = {r["variant"]: r for r in report["results"]}
    assert rows["scalekv"]["diff"] == 0.0 and rows["scalekv"]["wins"] == 0 == rows["scalekv"]["losses"]
    assert report["weights"] == micro_model.source and report["config"]["profile_path"] == profile_path
    for r in rows.values():
        assert len(r["psnr_per_seed"]) == 3 and 0 < r["kv_ratio"] < 1
