"""Training recipes: one-step smoke tests on var-micro, resumption, and strict export/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.models.registry import get_spec, load_into, save_safetensors
from engine.models.var import VAR
from engine.models.vqvae import VQVAE
from engine.training.tokenizer import TokenizerTrainConfig, train_tokenizer
from engine.training.transformer import TransformerTrainConfig, export_transformer, pretokenize, train_transformer


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_tokenizer_trains_and_resumes(tmp_path):
    cfg = TokenizerTrainConfig(model="var-micro", steps=2, batch_size=4, dtype="bfloat16", log_every=1, save_every=1)
    train_tokenizer(cfg, str(tmp_path), progress=False)
    cfg.steps = 3
    train_tokenizer(cfg, str(tmp_path), progress=False)  # resumes at step 2
    steps = [r["step"] for r in _log(tmp_path)]
    assert steps == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path))


def test_transformer_one_step_and_strict_export(tmp_path):
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=12, steps=1, batch_size=4,
                                 log_every=1, save_every=1)
    var = train_transformer(cfg, str(tmp_path / "run"), progress=False)
    (rec,) = _log(tmp_path / "run")
    assert math.isfinite(rec["loss"]) and len(rec["acc_per_scale"]) == spec.var.num_scales
    out = tmp_path / "transformer.safetensors"
    export_transformer(var, str(out))
    fresh = VAR(spec.var)
    load_into(fresh, out)  # strict
    assert torch.allclose(fresh.head.weight, var.head.weight.half().float())


def test_transformer_coarse_prefix_steps_and_init_from(tmp_path):
    """coarse_scales/full_every alternate prefix and full steps; init_from starts from given weights."""
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    start = VAR(spec.var)
    with torch.no_grad():
        start.head.bias.fill_(0.25)  # a marker no fresh init produces (VAR zeroes the head bias)
    init = tmp_path / "init.safetensors"
    export_transformer(start, str(init))
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=12, steps=4, batch_size=4,
                                 lr=1e-6, log_every=1, save_every=2, init_from=str(init), coarse_scales=2,
                                 full_every=2)
    var = train_transformer(cfg, str(tmp_path / "run"), progress=False)
    recs = _log(tmp_path / "run")
    assert [r["scales"] for r in recs] == [spec.var.num_scales, 2, spec.var.num_scales, 2]  # step 0 is full
    assert [len(r["acc_per_scale"]) for r in recs] == [r["scales"] for r in recs]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert (var.head.bias - 0.25).abs().max() < 0.01  # started from init_from, moved only by a tiny lr


def test_log_points_on_prefix_steps_also_log_the_next_full_step(tmp_path):
    """full_every 2 with an even log_every puts every log point on a prefix step; the next full step is logged."""
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=8, steps=6, batch_size=2,
                                 log_every=2, save_every=6, coarse_scales=2, full_every=2)
    train_transformer(cfg, str(tmp_path / "run"), progress=False)
    recs = _log(tmp_path / "run")
    n = spec.var.num_scales
    assert [(r["step"], r["scales"]) for r in recs] == [(2, 2), (3, n), (4, 2), (5, n), (6, 2)]


def test_pretokenize_extends_a_smaller_set(tmp_path, monkeypatch):
    """A larger num_images renders only the missing images; the result equals a one-go run."""
    import engine.training.transformer as trainer

    rendered = []
    real_render = trainer.render_batch
    monkeypatch.setattr(trainer, "render_batch", lambda seed, start, count: (
        rendered.extend(range(start, start + count)) or real_render(seed, start, count)))
    vae = VQVAE(get_spec("var-micro").vae).eval()
    grown, direct = tmp_path / "grown", tmp_path / "direct"
    grown.mkdir()
    direct.mkdir()
    pretokenize(vae, 5, grown, batch=2, progress=False)
    first = np.load(grown / "tokens.npy")
    rendered.clear()
    pretokenize(vae, 9, grown, batch=2, progress=False)
    assert rendered == [5, 6, 7, 8]  # only the new images
    pretokenize(vae, 9, direct, batch=4, progress=False)
    for name in ("tokens.npy", "labels.npy"):
        assert np.array_equal(np.load(grown / name), np.load(direct / name)), name
    assert np.array_equal(np.load(grown / "tokens.npy")[:5], first)
    pretokenize(vae, 3, grown, progress=False)  # a smaller request keeps the set on disk
    assert len(np.load(grown / "labels.npy")) == 9


@pytest.mark.parametrize(("field", "value"), [("coarse_scales", 1), ("coarse_scales", 99), ("full_every", 0),
                                              ("batch_size", 0), ("init_from", "/no/such/weights.safetensors")])
def test_transformer_config_errors_name_the_field(tmp_path, field, value):
    cfg = TransformerTrainConfig(model="var-micro", num_images=4, steps=1, batch_size=2)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        train_transformer(cfg, str(tmp_path / "run"), progress=False)
