"""Infinity's BSQ tokenizer: the released key layouts (meta device), quantisation, the
multi-scale residual, patchify, the next-scale input, loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.models.bsq import BSQTokenizer, NextScaleState, load_bsq_state_dict
from engine.models.catalog import get_infinity_spec
from engine.models.config import BSQConfig
from tests.conftest import perturb_


def meta_shapes(cfg: BSQConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        tok = BSQTokenizer(cfg)
    return {k: tuple(v.shape) for k, v in tok.state_dict().items()}


def conv(cout: int, cin: int, k: int) -> dict[str, tuple[int, ...]]:
    return {"conv.weight": (cout, cin, k, k), "conv.bias": (cout,)}


def resblock_manifest(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.norm1.norm.weight": (cin,), f"{prefix}.norm1.norm.bias": (cin,),
           f"{prefix}.norm2.norm.weight": (cout,), f"{prefix}.norm2.norm.bias": (cout,)}
    out.update({f"{prefix}.conv1.{k}": s for k, s in conv(cout, cin, 3).items()})
    out.update({f"{prefix}.conv2.{k}": s for k, s in conv(cout, cout, 3).items()})
    if cin != cout:
        out.update({f"{prefix}.nin_shortcut.{k}": s for k, s in conv(cout, cin, 1).items()})
    return out


def flux_manifest(d: int, mult: tuple[int, ...], ch: int = 128, blocks: int = 2) -> dict[str, tuple[int, ...]]:
    """The FLUX-VAE layout: encoder levels of ``blocks`` ResNet blocks with a stride-2 conv after
    each but the last; decoder levels (indexed by resolution) of blocks + 1 with an upsample
    on each but level 0; middle block_1 / block_2; GroupNorm out; bit mask of the quantiser."""
    m: dict[str, tuple[int, ...]] = {f"encoder.conv_in.{k}": s for k, s in conv(ch, 3, 3).items()}
    cin = ch
    for i, f in enumerate(mult):
        for j in range(blocks):
            m.update(resblock_manifest(f"encoder.down.{i}.block.{j}", cin, ch * f))
            cin = ch * f
        if i < len(mult) - 1:
            m.update({f"encoder.down.{i}.downsample.conv.{k}": s for k, s in conv(cin, cin, 3).items()})
    for name in ("block_1", "block_2"):
        m.update(resblock_manifest(f"encoder.mid.{name}", cin, cin))
        m.update(resblock_manifest(f"decoder.mid.{name}", cin, cin))
    m.update({"encoder.norm_out.norm.weight": (cin,), "encoder.norm_out.norm.bias": (cin,)})
    m.update({f"encoder.conv_out.{k}": s for k, s in conv(d, cin, 3).items()})
    m.update({f"decoder.conv_in.{k}": s for k, s in conv(cin, d, 3).items()})
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            m.update(resblock_manifest(f"decoder.up.{i}.block.{j}", cin, ch * mult[i]))
            cin = ch * mult[i]
        if i >= 1:
            m.update({f"decoder.up.{i}.upsample.conv.{k}": s for k, s in conv(cin, cin, 3).items()})
    m.update({"decoder.norm_out.norm.weight": (ch,), "decoder.norm_out.norm.bias": (ch,)})
    m.update({f"decoder.conv_out.{k}": s for k, s in conv(3, ch, 3).items()})
    m["quantizer.lfq.mask"] = (d,)
    return m


@pytest.mark.parametrize("name,d,mult,stride,bits", [
    ("infinity-2b", 32, (1, 2, 4, 4, 4), 16, 32),  # infinity_vae_d32_reg
    ("infinity-8b", 14, (1, 2, 4, 4), 8, 56),  # infinity_vae_d56_f8_14_patchify
])
def test_released_tokenizer_layouts(name, d, mult, stride, bits):
    cfg = get_infinity_spec(name).tokenizer
    assert (cfg.codebook_dim, cfg.ch_mult, cfg.stride, cfg.token_bits) == (d, mult, stride, bits)
    shapes = meta_shapes(cfg)
    assert shapes == flux_manifest(d, mult)
    # spot checks written out: the ends, a channel change, the lowest level
    assert shapes["encoder.conv_out.conv.weight"] == (d, 512, 3, 3)
    assert shapes["decoder.conv_in.conv.weight"] == (512, d, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.conv.weight"] == (256, 128, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.conv.weight"] == (128, 256, 1, 1)
    last = len(mult) - 1
    assert f"encoder.down.{last}.downsample.conv.conv.weight" not in shapes
    assert "decoder.up.0.upsample.conv.conv.weight" not in shapes
    assert not any("attn" in k for k in shapes)  # built without middle attention


@pytest.fixture(scope="module")
def micro_tok():
    torch.manual_seed(0)
    return perturb_(BSQTokenizer(get_infinity_spec("infinity-micro").tokenizer), 0.02, seed=3).eval()


@pytest.fixture(scope="module")
def patch_tok():
    cfg = dataclasses.replace(get_infinity_spec("infinity-micro").tokenizer, codebook_dim=2, patchify=True)
    torch.manual_seed(0)
    return perturb_(BSQTokenizer(cfg), 0.02, seed=4).eval()


def test_binary_spherical_quantisation(micro_tok):
    bsq = micro_tok.bsq
    z = torch.randn(3, 8, 2, 2)
    codes, bits = bsq.quantize(z)
    assert torch.equal(bits.permute(0, 3, 1, 2).bool(), z > 0)
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, 8**-0.5))
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(3, 2, 2))  # on the unit sphere
    torch.testing.assert_close(bsq.bits_to_codes(bits), codes)
    assert bsq.mask.tolist() == [128, 64, 32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("which", ["plain", "patchify"])
def test_encode_decode_shapes_and_residual(micro_tok, patch_tok, which):
    tok = micro_tok if which == "plain" else patch_tok
    schedule = get_infinity_spec("infinity-micro").model.schedule(2.0)  # (1,1) (2,1) (4,2) (6,3)
    h, w = schedule[-1][0] * tok.config.token_stride, schedule[-1][1] * tok.config.token_stride
    img = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens, f_hat = tok.encode(img, schedule)
        recon = tok.decode(f_hat)
    assert [tuple(t.shape) for t in tokens] == [(2, a * b, tok.config.token_bits) for a, b in schedule]
    assert f_hat.shape == (2, tok.config.codebook_dim, *tok.latent_schedule(schedule)[-1])
    assert recon.shape == img.shape and recon.abs().max() <= 1
    # the decoded tokens rebuild exactly the f_hat the encoder accumulated
    torch.testing.assert_close(tok.tokens_to_fhat(tokens, schedule), f_hat)
    # each scale's residual shrinks what is left to explain
    z = tok.encode_latent(img).detach()
    assert (z - f_hat).norm() < z.norm()


def test_patchify_token_layout(patch_tok):
    bits = torch.randint(0, 2, (2, 4, 6, 2), dtype=torch.uint8)  # latent grid 4x6, d = 2
    tokens = patch_tok.tokens_from_latent_bits(bits)
    assert tokens.shape == (2, 6, 8)
    assert torch.equal(patch_tok.latent_bits_from_tokens(tokens, (2, 3)), bits)
    # token (0, 0) channel c * 4 + 2 dy + dx is latent cell (dy, dx) channel c
    assert tokens[0, 0].tolist() == [bits[0, dy, dx, c].item() for c in range(2) for dy in range(2) for dx in range(2)]


@pytest.mark.parametrize("which", ["plain", "patchify"])
def test_next_scale_input_teacher_forcing_matches_generation(micro_tok, patch_tok, which):
    tok = micro_tok if which == "plain" else patch_tok
    schedule = get_infinity_spec("infinity-micro").model.schedule(1.0)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 2, (3, h * w, tok.config.token_bits), generator=g, dtype=torch.uint8)
              for h, w in schedule]
    tf = tok.teacher_forcing_input(tokens, schedule)
    state = NextScaleState(tok, schedule, 3, "cpu")
    step = [state.add(si, t) for si, t in enumerate(tokens)]
    assert step[-1] is None
    torch.testing.assert_close(tf, torch.cat(step[:-1], dim=1))
    assert tf.shape == (3, sum(h * w for h, w in schedule) - 1, tok.config.token_bits)
    # the first scale's input: the 1x1 codes, upsampled and resized to the 2x2 grid
    grids = tok.latent_schedule(schedule)
    codes = tok.bsq.bits_to_codes(tok.latent_bits_from_tokens(tokens[0], schedule[0]))
    up = torch.nn.functional.interpolate(codes, size=grids[-1], mode="bilinear")
    want = tok.features_to_tokens(torch.nn.functional.interpolate(up, size=grids[1], mode="bilinear"))
    torch.testing.assert_close(tf[:, : schedule[1][0] * schedule[1][1]], want)
    area = tok.teacher_forcing_input(tokens, schedule, mode="area")
    assert area.shape == tf.shape and not torch.allclose(area, tf)


def test_tokenizer_loader_accepts_released_names_and_is_strict(micro_tok):
    sd = micro_tok.state_dict()
    # unwrapped conv / norm names, and the quantiser's second name, as in released files
    plain = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}
    plain["quantize.lfq.mask"] = sd["quantizer.lfq.mask"]
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.block.0.norm1.weight" in plain
    fresh = BSQTokenizer(micro_tok.config)
    load_bsq_state_dict(fresh, plain)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    load_bsq_state_dict(BSQTokenizer(micro_tok.config), dict(sd))  # the wrapped names load too
    with pytest.raises(ValueError, match="bit mask"):
        load_bsq_state_dict(BSQTokenizer(micro_tok.config), dict(sd, **{"quantizer.lfq.mask": torch.arange(8)}))
    with pytest.raises(ValueError, match="decoder.conv_out"):
        load_bsq_state_dict(BSQTokenizer(micro_tok.config),
                            {k: v for k, v in sd.items() if "decoder.conv_out" not in k})
    with pytest.raises(ValueError, match="surplus"):
        load_bsq_state_dict(BSQTokenizer(micro_tok.config), dict(sd, surplus=torch.zeros(1)))
