"""Calibration and scale profiles: deterministic, validated against the model, CLI round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine.calibrate import calibrate, rank_drafters, zscore_within_scales
from memory.profile import ProfileMismatchError, ScaleProfile


@pytest.fixture(scope="module")
def micro_profile(micro_model):
    return calibrate(micro_model, num_requests=3, num_queries=16)


def test_calibration_is_deterministic(micro_model, micro_profile):
    again = calibrate(micro_model, num_requests=3, num_queries=16)
    assert again.to_dict() == micro_profile.to_dict()


def test_profile_shape_and_drafter_count(micro_model, micro_profile):
    cfg = micro_model.spec.var
    p = micro_profile
    assert p.model == "var-micro" and p.patch_nums == tuple(cfg.patch_nums) and p.depth == cfg.depth
    assert p.drafters[0] == () and p.num_drafter_pairs == cfg.num_scales - 1 == p.settings.num_drafters
    for si in range(1, cfg.num_scales):
        assert 0 < p.current_mass[si][0] < 1 and 0 < p.history_topk[si][0] < 1
        assert abs(sum(p.zscore[si])) < 1e-5
        assert all(abs(a - c * t) < 1e-6 for a, c, t in zip(p.asi[si], p.current_mass[si], p.history_topk[si]))
    # the drafters are the lowest z-scores overall
    worst = max(p.zscore[si][la] for si in range(cfg.num_scales) for la in p.drafters[si])
    others = [p.zscore[si][la] for si in range(1, cfg.num_scales) for la in range(cfg.depth)
              if la not in p.drafters[si]]
    assert worst <= min(others)


def test_rank_drafters_ranks_globally_and_skips_scale_zero():
    asi = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 1.0, 9.0]], dtype=torch.float64)
    z = zscore_within_scales(asi)
    assert torch.allclose(z[0], torch.zeros(3, dtype=torch.float64))
    assert rank_drafters(z, 2) == [[], [0], [1]]
    assert rank_drafters(z, 0) == [[], [], []]
    with pytest.raises(ValueError, match="num_drafters"):
        calibrate(_Stub(), num_drafters=-1)  # validated before running anything


class _Stub:
    """Just enough of a LoadedModel for argument validation."""

    class spec:  # noqa: N801
        name = "stub"

        class var:  # noqa: N801
            num_scales, depth, num_classes = 3, 2, 10
            patch_nums = (1, 2, 3)


def test_profile_roundtrip_and_mismatches_are_rejected(tmp_path, micro_profile):
    path = tmp_path / "p.json"
    micro_profile.save(path)
    loaded = ScaleProfile.load(path, "var-micro", (1, 2, 4, 8), 2)
    assert loaded == micro_profile
    with pytest.raises(ProfileMismatchError, match="model is 'var-micro'.*var-tiny"):
        ScaleProfile.load(path, "var-tiny")
    with pytest.raises(ProfileMismatchError, match="patch_nums"):
        ScaleProfile.load(path, "var-micro", (1, 2, 3, 8), 2)
    with pytest.raises(ProfileMismatchError, match="depth"):
        ScaleProfile.load(path, "var-micro", (1, 2, 4, 8), 3)
    bad = json.loads(path.read_text())
    del bad["depth"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="missing field 'depth'"):
        ScaleProfile.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        ScaleProfile.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"drafters\[1\]"):
        dataclasses.replace(micro_profile, drafters=((), (5,), (), ()))


def test_calibrate_cli_writes_a_profile(tmp_path, capsys):
    from scalekv.cli import main

    out = tmp_path / "prof.json"
    rc = main(["calibrate", "--model", "var-micro", "--random-init", "--num-requests", "2", "--num-queries", "8",
               "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "var-micro" and "drafters_per_scale" in summary
    prof = ScaleProfile.load(out, "var-micro", (1, 2, 4, 8), 2)
    assert prof.settings.num_requests == 2 and prof.settings.weights == "random-init"
