"""Training recipes: one-step smoke tests on var-micro, resumption, and strict export/load."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.models.registry import get_spec, load_into, save_safetensors
from engine.models.var import VAR
from engine.models.vqvae import VQVAE
from training.tokenizer import TokenizerTrainConfig, train_tokenizer
from training.transformer import (
    BudgetSizer,
    TransformerTrainConfig,
    codebook_neighbours,
    distillation_loss,
    encode_training_images,
    export_transformer,
    pretokenize,
    self_correction_batch,
    train_transformer,
)


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
    assert math.isfinite(rec["loss"]) and rec["ce"] == rec["loss"]  # no distillation: the loss is the cross-entropy
    assert len(rec["acc_per_scale"]) == spec.var.num_scales
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
    import training.transformer as trainer

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
                                              ("batch_size", 0), ("init_from", "/no/such/weights.safetensors"),
                                              ("perturb_rate", 1.5), ("perturb_neighbours", 0),
                                              ("distill_from", "/no/such/teacher.safetensors"),
                                              ("distill_weight", 1.5)])
def test_transformer_config_errors_name_the_field(tmp_path, field, value):
    cfg = TransformerTrainConfig(model="var-micro", num_images=4, steps=1, batch_size=2)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        train_transformer(cfg, str(tmp_path / "run"), progress=False)


def _tiny_tokenizer_batch(n: int):
    """The shipped var-tiny tokenizer, latents of training images 0..n-1 and their tokens per scale."""
    spec = get_spec("var-tiny")
    vae = VQVAE(spec.vae)
    load_into(vae, "engine/models/weights/var-tiny/tokenizer.safetensors")
    vae.eval()
    latent = encode_training_images(vae, torch.arange(n))
    return vae.quantize, latent, vae.quantize.encode_to_indices(latent)


def test_self_correction_at_rate_zero_is_teacher_forcing():
    q, latent, gt = _tiny_tokenizer_batch(4)
    inputs, targets = self_correction_batch(q, latent, gt, q.num_scales, 0.0, codebook_neighbours(q, 8),
                                            torch.Generator().manual_seed(0))
    assert torch.allclose(inputs, q.teacher_forcing_input(gt))
    assert torch.equal(targets, torch.cat(gt, dim=1))
    prefix_in, prefix_tg = self_correction_batch(q, latent, gt, 3, 0.0, codebook_neighbours(q, 8),
                                                 torch.Generator().manual_seed(0))
    assert torch.allclose(prefix_in, q.teacher_forcing_input(gt[:3]))
    assert torch.equal(prefix_tg, torch.cat(gt[:3], dim=1))


def test_self_correction_targets_undo_the_perturbation():
    """Perturbed inputs, re-quantised targets: the last scale's target brings the perturbed map back
    near the clean reconstruction; the same kind of perturbation left uncorrected stays in."""
    q, latent, gt = _tiny_tokenizer_batch(8)
    neighbours, gen = codebook_neighbours(q, 8), torch.Generator().manual_seed(0)
    inputs, targets = self_correction_batch(q, latent, gt, q.num_scales, 0.3, neighbours, gen)
    assert not torch.allclose(inputs, q.teacher_forcing_input(gt))  # something was perturbed
    assert torch.equal(targets[:, :1], gt[0])  # nothing is perturbed before the first scale
    side = q.patch_nums[-1]
    fed = inputs[:, -side * side:].transpose(1, 2).reshape(latent.shape)  # the map before the last scale
    uncorrected = []  # the same kind of perturbation of the ground truth, nothing re-quantised
    for tok in gt[:-1]:
        flip = torch.rand(tok.shape, generator=gen) < torch.rand(tok.shape[0], 1, generator=gen) * 0.3
        uncorrected.append(torch.where(flip, neighbours[tok, torch.randint(0, 8, tok.shape, generator=gen)], tok))
    with torch.no_grad():
        corrected = fed + q.upsampled_residual(targets[:, -side * side:], q.num_scales - 1)
        left_in = q.indices_to_fhat([*uncorrected, gt[-1]])
        clean = q.indices_to_fhat(gt)
    err = {name: float((m - latent).pow(2).mean()) for name, m in
           (("corrected", corrected), ("uncorrected", left_in), ("clean", clean))}
    # the error the perturbation adds over the clean reconstruction: mostly removed (measured: ~10% left)
    assert err["corrected"] - err["clean"] < 0.3 * (err["uncorrected"] - err["clean"]), err


def test_transformer_trains_with_self_correction(tmp_path):
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=8, steps=2, batch_size=4,
                                 log_every=1, save_every=2, coarse_scales=2, full_every=2, perturb_rate=0.5)
    train_transformer(cfg, str(tmp_path / "run"), progress=False)
    recs = _log(tmp_path / "run")
    assert [r["scales"] for r in recs] == [spec.var.num_scales, 2]
    assert all(math.isfinite(r["loss"]) for r in recs)


def test_pretokenize_with_render_workers_gives_the_same_set(tmp_path):
    """Rendering in worker processes changes where images are drawn, not which: the sets match."""
    vae = VQVAE(get_spec("var-micro").vae).eval()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    pretokenize(vae, 9, one, batch=3, progress=False)
    pretokenize(vae, 9, two, batch=1, progress=False, workers=2)  # 9 chunks: two windows of 4 x workers
    for name in ("tokens.npy", "labels.npy"):
        assert np.array_equal(np.load(one / name), np.load(two / name)), name


def test_budget_sizer_spends_the_remaining_budget_at_the_timed_rate(monkeypatch):
    """Settling steps are not timed; the rate over the rest of the warm-up sets the length."""
    clock = iter([100.0, 106.0])  # marked after step 2, read again at step 10: 8 steps in 6 s
    sizer = BudgetSizer(budget_s=60.0, warmup=10, device="cpu")
    monkeypatch.setattr(sizer, "_now", lambda: next(clock))
    assert [sizer.after_step(s, elapsed=float(s)) for s in range(1, 10)] == [None] * 9
    assert sizer.mark == (2, 100.0)
    assert sizer.after_step(10, elapsed=20.0) == 10 + int(40.0 / 0.75)  # 40 s left at 0.75 s per step


def test_time_budget_sizes_the_run_after_warmup_and_resume_keeps_it(tmp_path):
    """With a time budget the step count is fixed at the end of the warm-up (logged, checkpointed),
    the run stops there, and a resumed run keeps that length instead of re-sizing."""
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=8, steps=1, batch_size=2,
                                 warmup=10, log_every=1000, save_every=1000, time_budget_s=1.0)
    run = tmp_path / "run"
    train_transformer(cfg, str(run), progress=False)
    recs = _log(run)
    sized = [r for r in recs if "sized_steps" in r]
    assert len(sized) == 1 and sized[0]["step"] == cfg.warmup
    total = sized[0]["sized_steps"]
    assert total > cfg.warmup  # cfg.steps (1) was replaced by the sized length
    assert recs[-1]["step"] == total  # the last step is logged
    state = torch.load(run / "ckpt.pt", weights_only=False)
    assert state["step"] == total and state["config"]["steps"] == total
    train_transformer(cfg, str(run), progress=False)  # resumed at the end: nothing more to do
    assert _log(run) == recs


@pytest.mark.parametrize(("field", "changes"), [("time_budget_s", {"time_budget_s": 0.0}),
                                                ("warmup", {"time_budget_s": 60.0, "warmup": 3}),
                                                ("render_workers", {"render_workers": 0}),
                                                ("save_every", {"save_every": 0})])
def test_budget_and_worker_settings_errors_name_the_field(tmp_path, field, changes):
    cfg = TransformerTrainConfig(model="var-micro", num_images=4, steps=1, batch_size=2, **changes)
    with pytest.raises(ValueError, match=field):
        train_transformer(cfg, str(tmp_path / "run"), progress=False)


def test_distillation_loss_mixes_hard_and_soft_targets():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    hard = torch.tensor(1.25)
    assert distillation_loss(student, teacher, hard, 0.0) == hard
    assert torch.isclose(distillation_loss(teacher, teacher, hard, 0.3), 0.7 * hard)  # KL(p || p) = 0
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()  # per token
    assert torch.isclose(distillation_loss(student, teacher, hard, 1.0), kl, atol=1e-6) and kl > 0


def test_distillation_pulls_the_model_towards_the_teacher(tmp_path):
    """Pure distillation (weight 1) on var-micro: after a few steps the model's distributions are
    closer to the teacher's (KL on a fixed batch falls), unlike the same steps on the hard tokens
    alone; a teacher of another schedule is refused."""
    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    torch.manual_seed(7)
    teacher = VAR(spec.var)
    with torch.no_grad():
        teacher.head.weight.normal_(0, 0.5)  # a peaked, input-dependent teacher far from a fresh init
    teacher_path = tmp_path / "teacher.safetensors"
    save_safetensors(teacher, teacher_path)
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=16, steps=25, batch_size=8,
                                 lr=3e-3, warmup=1, log_every=5, save_every=100, distill_from=str(teacher_path),
                                 distill_model="var-micro", distill_weight=1.0)
    labels = torch.arange(8) % spec.var.num_classes
    inputs = torch.randn(8, sum(spec.var.scale_lengths()) - 1, spec.var.z_channels, generator=torch.Generator()
                         .manual_seed(1))

    def kl_to_teacher(model: VAR) -> float:
        model.eval()
        teacher.eval()
        with torch.no_grad():
            return float(distillation_loss(model(labels, inputs), teacher(labels, inputs), torch.tensor(0.0), 1.0))

    torch.manual_seed(0)
    before = kl_to_teacher(VAR(spec.var))  # train_transformer's init: same seed, same fresh weights
    distilled = kl_to_teacher(train_transformer(cfg, str(tmp_path / "run"), progress=False))
    hard_only = kl_to_teacher(train_transformer(replace(cfg, distill_weight=0.0), str(tmp_path / "hard"),
                                                progress=False))
    assert distilled < before and distilled < 0.8 * hard_only  # the same steps on hard tokens only do not
    with pytest.raises(ValueError, match="distill_model"):
        train_transformer(TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=4, steps=1,
                                                 batch_size=2, distill_from=str(teacher_path),
                                                 distill_model="var-tiny"), str(tmp_path / "run2"), progress=False)


def test_export_only_writes_the_latest_checkpoint_without_training(tmp_path, capsys):
    """`scalekv train transformer --export-only`: the run's checkpoint as strict-loading fp16
    weights, no step taken; a run dir without a checkpoint is an error naming run_dir."""
    from scalekv.cli import main

    spec = get_spec("var-micro")
    tok = tmp_path / "tok.safetensors"
    save_safetensors(VQVAE(spec.vae), tok)
    run = tmp_path / "run"
    cfg = TransformerTrainConfig(model="var-micro", tokenizer=str(tok), num_images=8, steps=2, batch_size=4,
                                 log_every=1, save_every=1)
    var = train_transformer(cfg, str(run), progress=False)
    (run / "transformer.safetensors").unlink(missing_ok=True)
    assert main(["train", "transformer", "--model", "var-micro", "--run-dir", str(run), "--export-only"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    fresh = VAR(spec.var)
    load_into(fresh, run / "transformer.safetensors")  # strict
    assert torch.equal(fresh.head.weight, var.head.weight.half().float())
    assert len(_log(run)) == 2  # nothing trained
    assert main(["train", "transformer", "--model", "var-micro", "--run-dir", str(tmp_path / "empty"),
                 "--export-only"]) == 2
    assert "run_dir: no checkpoint" in capsys.readouterr().err
