"""Infinity: official key/shape manifests (built on the meta device), the micro model's cached
scale-by-scale forward against teacher forcing, bitwise sampling, the loader's quirks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.infinity_reference import TextImageRequest, generate_infinity_reference, run_infinity_scales
from engine.models.catalog import INFINITY_MODELS, get_infinity_spec
from engine.models.config import InfinitySpec
from engine.models.infinity import Infinity, star_positions
from engine.models.infinity_loading import load_infinity_state_dict
from engine.models.registry import LoadedInfinity, build_infinity
from engine.reference import ContiguousKVCache
from engine.sampling import guide_constant, make_generator, sample_bits, sample_scale_bits
from tests.conftest import perturb_


def meta_state(cfg) -> tuple[dict[str, tuple[int, ...]], Infinity]:
    with torch.device("meta"):
        model = Infinity(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


# ----- manifests -------------------------------------------------------------------------------
# From the reference notes on the released checkpoints: C width, H heads, d bits per token,
# Ct5 = 2048 text channels, 512 cfg_uncond rows, 15 levels, FFN 4C, block_chunks = 8.
def top_manifest(c: int, heads_pool_q: tuple[int, int], d: int) -> dict[str, tuple[int, ...]]:
    ct5 = 2048
    return {
        "cfg_uncond": (512, ct5),
        "pos_start": (1, 1, c),
        "text_norm.weight": (ct5,),
        "text_proj_for_sos.ca.mat_q": (1, *heads_pool_q),
        "text_proj_for_sos.ca.mat_kv.weight": (2 * c, ct5),
        "text_proj_for_sos.ca.v_bias": (c,),
        "text_proj_for_sos.ca.proj.weight": (c, c),
        "text_proj_for_sos.ca.proj.bias": (c,),
        "text_proj_for_ca.0.weight": (c, ct5),
        "text_proj_for_ca.0.bias": (c,),
        "text_proj_for_ca.2.weight": (c, c),
        "text_proj_for_ca.2.bias": (c,),
        "lvl_embed.weight": (15, c),
        "word_embed.weight": (c, d),
        "word_embed.bias": (c,),
        "shared_ada_lin.1.weight": (6 * c, c),
        "shared_ada_lin.1.bias": (6 * c,),
        "head_nm.ada_lin.1.weight": (2 * c, c),
        "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (2 * d, c),
        "head.bias": (2 * d,),
    }


def block_manifest(c: int, h: int) -> dict[str, tuple[int, ...]]:
    return {
        "sa.mat_qkv.weight": (3 * c, c),
        "sa.q_bias": (c,),
        "sa.v_bias": (c,),
        "sa.zero_k_bias": (c,),
        "sa.scale_mul_1H11": (1, h, 1, 1),
        "sa.proj.weight": (c, c),
        "sa.proj.bias": (c,),
        "ca.mat_q.weight": (c, c),
        "ca.mat_q.bias": (c,),
        "ca.mat_kv.weight": (2 * c, c),
        "ca.v_bias": (c,),
        "ca.proj.weight": (c, c),
        "ca.proj.bias": (c,),
        "ffn.fc1.weight": (4 * c, c),
        "ffn.fc1.bias": (4 * c,),
        "ffn.fc2.weight": (c, 4 * c),
        "ffn.fc2.bias": (c,),
        "ca_norm.weight": (c,),
        "ca_norm.bias": (c,),
        "ada_gss": (1, 1, 6, c),
    }


# (name, depth, C, H, bits a token, pool query (heads, dim), params total / per block / other, in millions)
OFFICIAL = [
    ("infinity-2b", 32, 2048, 16, 32, (16, 128), 2205.0, 67.1, 55.8),
    ("infinity-8b", 40, 3584, 28, 56, (16, 224), 8376.0, 205.6, 152.2),
]


@pytest.mark.parametrize("name,depth,c,h,d,pool_q,total,per_block,other", OFFICIAL)
def test_official_transformer_keys_and_shapes(name, depth, c, h, d, pool_q, total, per_block, other):
    spec = get_infinity_spec(name)
    shapes, model = meta_state(spec.model)
    for k, shape in top_manifest(c, pool_q, d).items():
        assert shapes[k] == shape, k
    per_chunk = depth // 8
    for ci in range(8):
        for j in range(per_chunk):
            for k, shape in block_manifest(c, h).items():
                assert shapes[f"block_chunks.{ci}.module.{j}.{k}"] == shape
    assert f"block_chunks.7.module.{per_chunk}.ada_gss" not in shapes
    assert not any(k.startswith("blocks.") for k in shapes)
    # No derived buffers: the masks are computed, never stored.
    assert not any("attn_bias" in k or "lvl_1L" in k for k in shapes)
    n_total = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.block_list[0].parameters())
    assert abs(n_total / 1e6 - total) < 1.0
    assert abs(n_block / 1e6 - per_block) < 0.1
    assert abs((n_total - depth * n_block) / 1e6 - other) < 0.1


def test_official_schedules():
    cfg = get_infinity_spec("infinity-2b").model
    sched = cfg.schedule(1.0, "1M")
    assert [h for h, _ in sched] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    lens = cfg.scale_lengths(1.0, "1M")
    assert lens == [h * w for h, w in sched]
    assert sum(lens) == 10521 and sum(lens[:10]) == 2521 and sum(lens[:7]) == 521
    assert cfg.schedule(1.0, "0.25M") == sched[:10]
    wide = cfg.schedule(0.5)  # h/w = 0.5: the 2.0 list transposed
    assert wide[-1] == (45, 90) and all(w >= h for h, w in wide)
    assert cfg.nearest_ratio(1.9) == 2.0 and cfg.nearest_ratio(0.52) == 0.5
    assert get_infinity_spec("infinity-2b").image_size(1.0) == (1024, 1024)
    assert get_infinity_spec("infinity-8b").image_size(1.0) == (1024, 1024)  # stride 8 x patchify 2


def test_star_positions_share_the_final_grid():
    rows, cols = star_positions((4, 4), (64, 64))
    assert rows.view(4, 4)[:, 0].tolist() == [0, 16, 32, 48] and cols.view(4, 4)[0].tolist() == [0, 16, 32, 48]
    rows, cols = star_positions((64, 64), (64, 64))
    assert rows.max() == 63 and cols.view(64, 64)[0].tolist() == list(range(64))
    rows, _ = star_positions((3, 3), (64, 64))  # round(i * 64 / 3)
    assert rows.view(3, 3)[:, 0].tolist() == [0, 21, 43]


# ----- the micro model ------------------------------------------------------------------------
def micro_spec(patchify: bool = False) -> InfinitySpec:
    spec = get_infinity_spec("infinity-micro")
    if not patchify:
        return spec
    tok = dataclasses.replace(spec.tokenizer, codebook_dim=2, patchify=True)
    return dataclasses.replace(spec, name="infinity-micro-patchify", tokenizer=tok)


def build_micro(patchify: bool = False) -> LoadedInfinity:
    spec = micro_spec(patchify)
    torch.manual_seed(0)
    from engine.models.bsq import BSQTokenizer

    model, tok = Infinity(spec.model), BSQTokenizer(spec.tokenizer)
    perturb_(model, 0.05, seed=1)
    perturb_(tok, 0.02, seed=2)
    return LoadedInfinity(spec=spec, model=model.eval(), tokenizer=tok.eval(), source="random-init")


@pytest.fixture(scope="module")
def micro():
    return build_micro()


@pytest.fixture(scope="module")
def micro_patchify():
    return build_micro(patchify=True)


def texts(seed: int, lengths: list[int], channels: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, generator=g) for n in lengths]


def requests_for(m: LoadedInfinity, lengths: list[int], h_div_w: float = 1.0, **kw) -> list[TextImageRequest]:
    return [TextImageRequest(text=t, seed=10 + i, h_div_w=h_div_w, **kw).resolved(m)
            for i, t in enumerate(texts(0, lengths))]


@pytest.mark.parametrize("patchify,h_div_w", [(False, 1.0), (False, 2.0), (True, 1.0)])
def test_cached_scales_equal_teacher_forcing(micro, micro_patchify, patchify, h_div_w):
    m = micro_patchify if patchify else micro
    reqs = requests_for(m, [5, 2, 7], h_div_w=h_div_w, cfg=2.5)
    tokens, f_hat, cache, logits = run_infinity_scales(m, reqs, return_logits=True)
    schedule = reqs[0].schedule(m)
    inputs = m.tokenizer.teacher_forcing_input(tokens, schedule)
    with torch.no_grad():
        cond = m.model.cfg_condition([r.text for r in reqs])
        tf = m.model(cond, torch.cat((inputs, inputs)), schedule, reqs[0].rope_grid(m))
    assert tf.shape == (6, sum(h * w for h, w in schedule), 2 * m.spec.model.token_bits)
    torch.testing.assert_close(torch.cat(logits, dim=1), tf, atol=1e-4, rtol=1e-4)
    # the cache holds every scale of every row and layer
    assert cache.k[0].shape[2] == sum(h * w for h, w in schedule) and cache.k[0].shape[0] == 6
    # the tokens decode from the same f_hat the generation accumulated
    torch.testing.assert_close(m.tokenizer.tokens_to_fhat(tokens, schedule), f_hat)


def test_text_kv_computed_once_per_request(micro, monkeypatch):
    """The cross-attention K/V live in the condition; the blocks never project the text again."""
    from engine.models.infinity import CrossAttention

    calls = []
    original = CrossAttention.kv

    def counting(self, text):
        calls.append(self.pool)
        return original(self, text)

    monkeypatch.setattr(CrossAttention, "kv", counting)
    run_infinity_scales(micro, requests_for(micro, [3, 4]))
    # once per layer (for all rows at once) plus the attentive pool, not once per scale
    assert calls.count(False) == micro.spec.model.depth and calls.count(True) == 1


def test_bit_sampling_reproducible_and_batch_independent(micro):
    alone = run_infinity_scales(micro, requests_for(micro, [5]))[0]
    again = run_infinity_scales(micro, requests_for(micro, [5]))[0]
    batch = run_infinity_scales(micro, requests_for(micro, [5, 9, 1]))[0]
    for a, b, c in zip(alone, again, batch):
        assert torch.equal(a, b) and torch.equal(a[0], c[0])
        assert a.dtype == torch.uint8 and set(a.unique().tolist()) <= {0, 1}
    other = run_infinity_scales(micro, [dataclasses.replace(requests_for(micro, [5])[0], seed=99)])[0]
    assert any(not torch.equal(a, o) for a, o in zip(alone, other))


def test_generate_reference_images_and_aspect_ratios(micro):
    reqs = [TextImageRequest(text=t, seed=i, h_div_w=r) for i, (t, r) in enumerate(zip(texts(1, [4, 6, 3]),
                                                                                        [1.0, 2.0, 1.0]))]
    out = generate_infinity_reference(micro, reqs)
    assert [o.image.shape for o in out] == [(8, 8, 3), (12, 6, 3), (8, 8, 3)]
    assert out[0].stats["schedule"][-1] == [4, 4] and out[1].stats["schedule"][-1] == [6, 3]
    # requests 0 and 2 ran in one batch, request 1 alone: tokens still per request
    solo = generate_infinity_reference(micro, [reqs[0]])[0]
    assert all(torch.equal(a, b) for a, b in zip(solo.tokens, out[0].tokens))


def test_mixed_schedules_rejected_in_one_batch(micro):
    reqs = requests_for(micro, [3, 3])
    reqs[1] = dataclasses.replace(reqs[1], h_div_w=2.0)
    with pytest.raises(ValueError, match="one schedule"):
        run_infinity_scales(micro, reqs)
    with pytest.raises(ValueError, match="resolved"):
        run_infinity_scales(micro, [TextImageRequest(text=torch.randn(3, 32))])


def test_packed_rows_equal_batched_rows(micro):
    """A paged runner packs sequences into one row: the blocks give the same result."""
    model = micro.model
    cond = model.cfg_condition(texts(2, [4, 2]))
    sched = micro.spec.model.schedule(1.0)
    angles = model.rope(sched, sched[-1])[1]  # scale 1: 2x2 tokens
    x = torch.randn(4, 4, micro.spec.model.width)

    def dense(layer, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)

    def packed_attend(layer, q, k, v):
        parts = [dense(layer, q[:, :, i : i + 4], k[:, :, i : i + 4], v[:, :, i : i + 4]) for i in range(0, 16, 4)]
        return torch.cat(parts, dim=2)

    with torch.no_grad():
        rows = model.logits(model.run_blocks(x, cond, dense, angles), cond)
        pc = cond.packed([4, 4, 4, 4])
        packed = model.logits(model.run_blocks(x.reshape(1, 16, -1), pc, packed_attend, angles.repeat(4, 1)), pc)
    torch.testing.assert_close(packed.reshape(4, 4, -1), rows, atol=1e-5, rtol=1e-5)
    sub = cond.select([1, 3])
    torch.testing.assert_close(sub.pooled, cond.pooled[[1, 3]])


# ----- sampling ---------------------------------------------------------------------------------
def test_guide_constant_and_bit_sampling_rules():
    c, u = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(guide_constant(c, u, 3.0), torch.tensor([[4.0, -5.0]]))
    torch.testing.assert_close(guide_constant(c, u, 1.0), c)
    # bit 0: p(1) = sigmoid(-8) ~ 3e-4 < 1 - 0.97, dropped by top-p; bit 1: p(1) = 0.5
    logits = torch.tensor([[4.0, -4.0, 0.0, 0.0]]).repeat(4000, 1)
    bits = sample_bits(logits, 0, 0.97, make_generator(0))
    assert bits.shape == (4000, 2) and bits[:, 0].sum() == 0
    assert 1800 < int(bits[:, 1].sum()) < 2200
    assert torch.equal(bits, sample_bits(logits, 0, 0.97, make_generator(0)))
    # without top-p the rare value appears at about its probability
    rare = sample_bits(torch.tensor([[0.0, -2.0]]).repeat(20000, 1), 0, 0.0, make_generator(1))
    assert 1900 < int(rare.sum()) < 2900  # p(1) = sigmoid(-2) = 0.119


def test_tau_divides_before_guidance():
    class P:
        cfg, tau, top_k, top_p = 2.0, 0.5, 0, 0.0

    lc, lu = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    got = sample_scale_bits(lc, lu, [P()], [make_generator(3)])
    want = sample_bits(guide_constant(lc[0] / 0.5, lu[0] / 0.5, 2.0), 0, 0.0, make_generator(3))
    assert torch.equal(got[0], want)


# ----- loading ------------------------------------------------------------------------------------
def test_loader_quirks_are_explicit_and_the_rest_strict(micro):
    src = micro.model
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    fresh = Infinity(micro.spec.model)
    maxlen = micro.spec.model.text_maxlen
    # derived buffers dropped, a longer cfg_uncond trimmed
    long = dict(sd, attn_bias_for_masking=torch.zeros(1, 1, 5, 5), lvl_1L=torch.zeros(1, 5),
                cfg_uncond=torch.cat((sd["cfg_uncond"], torch.randn(7, 32))))
    rep = load_infinity_state_dict(fresh, long)
    assert sorted(rep["dropped"]) == ["attn_bias_for_masking", "lvl_1L"]
    assert rep["cfg_uncond"] == [f"trimmed {maxlen + 7} -> {maxlen}"]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a shorter cfg_uncond is padded with the model's own rows
    fresh = Infinity(micro.spec.model)
    own = fresh.cfg_uncond.detach().clone()
    short = dict(sd, cfg_uncond=sd["cfg_uncond"][:5])
    assert load_infinity_state_dict(fresh, short)["cfg_uncond"] == [f"padded 5 -> {maxlen} with the model's rows"]
    assert torch.equal(fresh.cfg_uncond[:5], sd["cfg_uncond"][:5]) and torch.equal(fresh.cfg_uncond[5:], own[5:])
    # the blocks.{i} layout maps onto block_chunks.{c}.module.{j}
    flat = {k.replace("block_chunks.1.module.0", "blocks.1").replace("block_chunks.0.module.0", "blocks.0"): v
            for k, v in sd.items()}
    assert any(k.startswith("blocks.1.") for k in flat)
    load_infinity_state_dict(Infinity(micro.spec.model), flat)
    # everything else is strict
    missing = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="head.bias"):
        load_infinity_state_dict(Infinity(micro.spec.model), missing)
    with pytest.raises(ValueError, match="extra_thing"):
        load_infinity_state_dict(Infinity(micro.spec.model), dict(sd, extra_thing=torch.zeros(1)))
    with pytest.raises(ValueError, match="word_embed.weight"):
        load_infinity_state_dict(Infinity(micro.spec.model), dict(sd, **{"word_embed.weight": torch.zeros(64, 9)}))


def test_build_infinity_from_files(tmp_path, micro):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no shipped weights"):
        build_infinity("infinity-micro")
    sd = micro.model.state_dict()
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k].contiguous() for k in keys[::2]}, str(shard_dir / "a.safetensors"))
    save_file({k: sd[k].contiguous() for k in keys[1::2]}, str(shard_dir / "b.safetensors"))
    torch.save(micro.tokenizer.state_dict(), tmp_path / "vae.pth")
    loaded = build_infinity("infinity-micro", checkpoint=shard_dir, tokenizer=tmp_path / "vae.pth")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])
    reqs = requests_for(micro, [4])
    a = run_infinity_scales(micro, reqs)[0]
    b = run_infinity_scales(loaded, reqs)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_catalog_is_torch_free_data():
    assert set(INFINITY_MODELS) == {"infinity-2b", "infinity-8b", "infinity-micro"}
    spec = get_infinity_spec("infinity-8b")
    assert spec.tokenizer.token_bits == 56 and spec.model.vocab_size == 112 and spec.default_tau == 1.0
    assert get_infinity_spec("infinity-2b").default_tau == 0.5
    with pytest.raises(ValueError, match="unknown Infinity model"):
        get_infinity_spec("infinity-3b")
    assert ContiguousKVCache(softmax_scales=[1.0, 1.0]).softmax_scales == [1.0, 1.0]
