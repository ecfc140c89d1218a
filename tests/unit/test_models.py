"""Model layout (official checkpoint keys/shapes) and the exactness properties the engine relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.registry import build_model, get_spec
from engine.models.var import VAR
from engine.models.vqvae import VQVAE
from engine.reference import ContiguousKVCache
from tests.conftest import perturb_


def _var_d16_manifest() -> dict[str, tuple[int, ...]]:
    """Expected keys and shapes of var_d16.pth, written from the reference notes (§1.5)."""
    c, h, seq, v, cvae, depth = 1024, 16, 680, 4096, 32, 16
    m = {
        "pos_start": (1, 1, c), "pos_1LC": (1, seq, c), "lvl_1L": (1, seq), "attn_bias_for_masking": (1, 1, seq, seq),
        "word_embed.weight": (c, cvae), "word_embed.bias": (c,), "class_emb.weight": (1001, c),
        "lvl_embed.weight": (10, c), "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (v, c), "head.bias": (v,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        m.update({
            b + "attn.scale_mul_1H11": (1, h, 1, 1), b + "attn.q_bias": (c,), b + "attn.v_bias": (c,),
            b + "attn.zero_k_bias": (c,), b + "attn.mat_qkv.weight": (3 * c, c), b + "attn.proj.weight": (c, c),
            b + "attn.proj.bias": (c,), b + "ffn.fc1.weight": (4 * c, c), b + "ffn.fc1.bias": (4 * c,),
            b + "ffn.fc2.weight": (c, 4 * c), b + "ffn.fc2.bias": (c,), b + "ada_lin.1.weight": (6 * c, c),
            b + "ada_lin.1.bias": (6 * c,),
        })
    return m


def test_var_d16_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = VAR(get_spec("var-d16").var)
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert got == _var_d16_manifest()
    assert len(got) == 220
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 310.3) < 0.1


def test_tokenizer_state_dict_matches_official_layout():
    with torch.device("meta"):
        vae = VQVAE(get_spec("var-d16").vae)
    sd = {k: tuple(t.shape) for k, t in vae.state_dict().items()}
    assert len(sd) == 324
    expected = {
        "quantize.ema_vocab_hit_SV": (10, 4096), "quantize.embedding.weight": (4096, 32),
        "quant_conv.weight": (32, 32, 3, 3), "post_quant_conv.weight": (32, 32, 3, 3),
        "encoder.conv_in.weight": (160, 3, 3, 3), "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3), "decoder.conv_out.weight": (3, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (640, 640, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1), "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (160, 160, 3, 3),
    }
    for i in range(4):
        expected[f"quantize.quant_resi.qresi_ls.{i}.weight"] = (32, 32, 3, 3)
        expected[f"quantize.quant_resi.qresi_ls.{i}.bias"] = (32,)
    for k, shape in expected.items():
        assert sd[k] == shape, k
    nin = sorted(k for k in sd if "nin_shortcut.weight" in k)
    assert nin == sorted(["encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.4.block.0.nin_shortcut.weight",
                          "decoder.up.3.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"])
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)
    assert not any(k.startswith("encoder.down.4.downsample") for k in sd)
    assert abs(sum(p.numel() for p in vae.parameters()) / 1e6 - 108.9) < 0.1
    assert vae.quantize.quant_resi.scale_to_phi == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_block_causal_mask_staircase():
    model = VAR(get_spec("var-micro").var)  # scales 1,2,4,8
    visible = model.attn_bias_for_masking[0, 0] == 0
    assert visible[0, 0] and not visible[0, 1]
    assert visible[1:5, :5].all() and not visible[1:5, 5:].any()
    assert visible[5:21, :21].all() and not visible[5:21, 21:].any()


def test_teacher_forcing_equals_cached_scale_by_scale(micro_model):
    var, vae, cfg = micro_model.var, micro_model.vae, micro_model.spec.var
    gen = torch.Generator().manual_seed(3)
    b = 3
    idx = [torch.randint(0, cfg.vocab_size, (b, p * p), generator=gen) for p in cfg.patch_nums]
    labels = torch.tensor([1, 4, cfg.num_classes])  # includes the null class
    inputs = vae.quantize.teacher_forcing_input(idx)
    with torch.no_grad():
        tf = var(labels, inputs)
        cache = ContiguousKVCache(micro_model)
        cond = var.condition(labels)
        outs, starts = [], cfg.scale_starts()
        for si, p in enumerate(cfg.patch_nums):
            nxt = None if si == 0 else inputs[:, starts[si] - 1 : starts[si] - 1 + p * p]
            x = var.embed_scale(si, cond, nxt)
            outs.append(var.logits(var.run_blocks(x, cond, cache.attend), cond))
    cached = torch.cat(outs, dim=1)
    assert tf.shape == cached.shape == (b, cfg.seq_len, cfg.vocab_size)
    assert (tf - cached).abs().max() < 1e-4
    assert tf.std() > 0.1  # the perturbed model is far from identity


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_prefix_forward_equals_the_same_positions_of_the_full_forward(micro_model, num_scales):
    """Training on the first K scales is exact: no scale sees a finer one."""
    var, vae, cfg = micro_model.var, micro_model.vae, micro_model.spec.var
    gen = torch.Generator().manual_seed(4)
    idx = [torch.randint(0, cfg.vocab_size, (2, p * p), generator=gen) for p in cfg.patch_nums]
    labels = torch.tensor([2, cfg.num_classes])
    inputs = vae.quantize.teacher_forcing_input(idx)
    n = sum(cfg.scale_lengths()[:num_scales])
    with torch.no_grad():
        full = var(labels, inputs)
        prefix = var(labels, inputs, num_scales=num_scales)
        prefix_from_short_inputs = var(labels, inputs[:, : n - 1], num_scales=num_scales)
    assert prefix.shape == (2, n, cfg.vocab_size)
    assert (prefix - full[:, :n]).abs().max() < 1e-4
    assert torch.equal(prefix, prefix_from_short_inputs)
    with pytest.raises(ValueError, match="num_scales"):
        var(labels, inputs, num_scales=cfg.num_scales + 1)


@pytest.mark.parametrize("unmasked_scales", [0, 1, 3, 100])
def test_pieced_block_causal_attention_equals_one_masked_sdpa(micro_model, unmasked_scales):
    var, cfg = micro_model.var, micro_model.spec.var
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, cfg.seq_len, 8, generator=gen) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=var.attn_bias_for_masking,
                                         scale=var.blocks[0].attn.softmax_scale)
    pieced = var._block_causal_attend(cfg.num_scales, unmasked_scales)(0, q, k, v)
    assert pieced.shape == dense.shape
    assert (pieced - dense).abs().max() < 1e-5


def test_next_scale_input_matches_an_independent_implementation(micro_model):
    q = micro_model.vae.quantize
    pn = q.patch_nums
    gen = torch.Generator().manual_seed(5)
    idx = [torch.randint(0, q.config.vocab_size, (2, p * p), generator=gen) for p in pn]
    full = pn[-1]
    f_hat = torch.zeros(2, q.config.z_channels, full, full)
    expected = []
    for si in range(len(pn) - 1):
        h = q.embedding(idx[si]).transpose(1, 2).reshape(2, -1, pn[si], pn[si])
        h = F.interpolate(h, size=(full, full), mode="bicubic")
        phi = q.quant_resi.qresi_ls[q.quant_resi.scale_to_phi[si]]
        f_hat = f_hat + 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)
        expected.append(F.interpolate(f_hat, size=(pn[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2))
    with torch.no_grad():
        tf = q.teacher_forcing_input(idx)
    assert torch.allclose(tf, torch.cat(expected, 1), atol=1e-5)


def test_tokenizer_encode_decode_shapes(micro_model):
    vae = micro_model.vae
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = vae.img_to_indices(x)
    assert [i.shape for i in idx] == [(2, p * p) for p in vae.config.patch_nums]
    img = vae.indices_to_img(idx)
    assert img.shape == x.shape and img.abs().max() <= 1


def test_official_tiebreak_for_seven_scales():
    from engine.models.vqvae import PhiSet

    assert PhiSet(4, 0.5, 4, 7).scale_to_phi == [0, 0, 1, 2, 2, 3, 3]


def test_vq_training_forward_gradients_flow():
    vae = VQVAE(get_spec("var-micro").vae)
    perturb_(vae, 0.01)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, vq_loss, _ = vae(x)
    (F.mse_loss(rec, x) + vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0


class _OutOfPlaceSiLU:
    """Stands in for ``torch.nn.functional`` inside vqvae: every SiLU out of place (the reference),
    and counts how many were asked to run in place."""

    def __init__(self) -> None:
        self.inplace_requests = 0

    def __getattr__(self, name):
        return getattr(F, name)

    def silu(self, x, inplace=False):
        self.inplace_requests += bool(inplace)
        return F.silu(x)


def _decode_with_out_of_place_silu(vae, f_hat, monkeypatch):
    import engine.models.vqvae as vqvae_module

    shim = _OutOfPlaceSiLU()
    with monkeypatch.context() as m:
        m.setattr(vqvae_module, "F", shim)
        out = vae.fhat_to_img(f_hat)
    return out, shim.inplace_requests


@pytest.mark.parametrize("which", ["var-micro", "var-tiny"])
def test_in_place_silu_decodes_bit_identically(micro_model, which, monkeypatch):
    """The decoder's in-place SiLU only overwrites fresh GroupNorm outputs: the image equals
    (torch.equal) a decode with every SiLU out of place, and the input f_hat is untouched."""
    from engine.models.registry import build_model

    vae = micro_model.vae if which == "var-micro" else build_model("var-tiny").vae
    full = vae.config.patch_nums[-1]
    f_hat = torch.randn(2, vae.config.z_channels, full, full, generator=torch.Generator().manual_seed(7)) * 2
    f_copy = f_hat.clone()
    with torch.no_grad():
        expected, inplace_requests = _decode_with_out_of_place_silu(vae, f_hat, monkeypatch)
        got = vae.fhat_to_img(f_hat)
    assert inplace_requests > 0  # the shipped code does ask for in-place SiLU
    assert torch.equal(f_hat, f_copy)
    assert got.std() > 0.01 and got.shape == (2, 3, vae.config.image_size, vae.config.image_size)
    assert torch.equal(got, expected)
    with torch.inference_mode():
        assert torch.equal(vae.fhat_to_img(f_hat), expected)


def test_in_place_silu_leaves_training_gradients_unchanged(monkeypatch):
    """Autograd through the in-place SiLU (encoder and decoder) gives the same loss and grads."""
    import engine.models.vqvae as vqvae_module

    vae = VQVAE(get_spec("var-micro").vae)
    perturb_(vae, 0.01)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def loss_and_grads():
        vae.zero_grad(set_to_none=True)
        rec, vq_loss, _ = vae(x)
        loss = (rec - x).pow(2).mean() + vq_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    with monkeypatch.context() as m:
        m.setattr(vqvae_module, "F", _OutOfPlaceSiLU())
        ref_loss, ref_grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def _official_phi_choice(share_quant_resi: int, num_scales: int) -> list[int]:
    """Official VAR (models/quant.py), written out independently: share 0 = PhiNonShared with one
    phi per scale, 1 = PhiShared, else PhiPartiallyShared; the latter two index by the tick
    nearest si / (SN - 1), ticks at 1/(3K) .. 1 - 1/(3K) only for K == 4, else 1/(2K) .. 1 - 1/(2K)."""
    import numpy as np

    if share_quant_resi == 1:
        return [0] * num_scales
    k = num_scales if share_quant_resi == 0 else share_quant_resi
    margin = 1 / (3 * k) if k == 4 else 1 / (2 * k)
    ticks = np.linspace(margin, 1 - margin, k)
    picks = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0  # upstream divides by zero at SN == 1
        d = np.abs(ticks - np.float64(at))
        picks.append(int(np.flatnonzero(d == d.min())[0]))  # first of the nearest (argmin's tie rule)
    return picks


@pytest.mark.parametrize("share", range(0, 9))
def test_phi_mapping_matches_the_official_rule(share):
    from engine.models.vqvae import PhiSet

    for num_scales in range(1, 16):
        with torch.device("meta"):
            phis = PhiSet(4, 0.5, share, num_scales)
        assert len(phis.qresi_ls) == (num_scales if share == 0 else share)
        assert phis.scale_to_phi == _official_phi_choice(share, num_scales), (share, num_scales)
        if share == 0:
            assert phis.scale_to_phi == list(range(num_scales))


def test_phi_mapping_hand_checked_cases_and_shipped_layout_unchanged():
    from engine.models.vqvae import PhiSet, phi_index_per_scale

    # The shipped configs (4 phis, 10 scales) keep the mapping the weights were trained with.
    assert phi_index_per_scale(4, 10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert PhiSet(4, 0.5, 4, 10).scale_to_phi == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert PhiSet(4, 0.5, 4, 4).scale_to_phi == [0, 1, 2, 3]  # var-micro
    # 2 phis at ticks 1/4, 3/4: scale 1 of 3 sits exactly between them and takes the first.
    assert phi_index_per_scale(2, 3) == [0, 0, 1]
    # 3 phis at 1/6, 1/2, 5/6 over 5 scales at 0, 1/4, 1/2, 3/4, 1.
    assert phi_index_per_scale(3, 5) == [0, 0, 1, 2, 2]
    sd = PhiSet(8, 0.5, 6, 10).state_dict()
    assert sorted(sd) == sorted(f"qresi_ls.{i}.{p}" for i in range(6) for p in ("weight", "bias"))


def _flops_per_image(var) -> float:
    """Multiply-adds x 2 of one image with CFG (2 sequences): linears per token (qkv 3d^2, proj
    d^2, MLP 8d^2) and attention (QK^T and AV over history + current) per layer and scale."""
    d, total, seen = var.width, 0.0, 0
    for n in var.scale_lengths():
        seen += n
        total += var.depth * n * (2 * 12 * d * d + 2 * 2 * d * seen)
    return 2 * total


def test_var_deep_is_deep_with_head_dim_64_at_var_tiny_cost():
    from engine.models.catalog import get_spec as spec_of

    deep, tiny = spec_of("var-deep"), spec_of("var-tiny")
    assert deep.var.depth >= 24 and deep.var.head_dim == 64
    assert deep.var.patch_nums == tiny.var.patch_nums and deep.vae == tiny.vae  # same tokenizer and schedule
    assert _flops_per_image(deep.var) <= 1.5 * _flops_per_image(tiny.var)
    m = build_model("var-deep", random_init=True)
    assert len(m.var.blocks) == deep.var.depth
