"""The paged Infinity engine (``InfinityEngine`` / ``InfinityRunner``) on infinity-micro with
random, perturbed weights and a tiny random T5 built here: the same tokens as the reference
loop for a batch mixing prompts, aspect ratios and resolutions; every page back; tokens that do
not depend on the batch; request validation for text-to-image models; ``scalekv generate``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from engine.api import make_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.infinity_engine import InfinityEngine  # noqa: E402
from engine.infinity_reference import TextImageRequest, generate_infinity_reference  # noqa: E402
from engine.infinity_runner import pack_bits, unpack_bits  # noqa: E402
from engine.models.registry import LoadedInfinity, build_model  # noqa: E402
from engine.request import ImageRequest, validate_records  # noqa: E402
from engine.text import TextEncoder  # noqa: E402
from tests.conftest import perturb_  # noqa: E402
from tests.tiny_t5 import write_tiny_t5  # noqa: E402


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def loaded():
    m = build_model("infinity-micro", random_init=True, seed=0)
    assert isinstance(m, LoadedInfinity)
    perturb_(m.model, 0.05, seed=1)  # blocks start near identity: make attention matter
    return m


def config(t5_dir, **kw) -> EngineConfig:
    return EngineConfig(**{"dtype": "float32", "block_size": 4, "kv_pool_bytes": 4 << 20,
                           "text_encoder": str(t5_dir), **kw})


MIXED = [
    dict(prompt="a red ring", seed=1),
    dict(prompt="a blue dog on the grass", seed=2, h_div_w=2.0, negative_prompt="blurry"),
    dict(prompt="a cat", seed=3, aspect_ratio="1:2", cfg=1.5, tau=0.7, top_p=0.9),
    dict(prompt="big sea", seed=4, resolution="tiny"),
    dict(prompt="a small green disk over the sea", seed=5, h_div_w=0.5),  # 1:2 -> the transposed template
    dict(prompt="a red ring", seed=6, h_div_w=1.9),  # snapped to 2.0
]


def requests(specs=MIXED) -> list[ImageRequest]:
    return [ImageRequest(request_id=f"r{i}", **s) for i, s in enumerate(specs)]


def reference_tokens(loaded, t5_dir, reqs: list[ImageRequest]) -> list[list[int]]:
    enc = TextEncoder(t5_dir, max_length=loaded.spec.model.text_maxlen)

    def text(p):
        return None if p is None else enc.encode([p])[0]

    trs = [TextImageRequest(text=text(r.prompt), negative_text=text(r.negative_prompt), seed=r.seed, cfg=r.cfg,
                            tau=r.tau, top_k=r.top_k, top_p=r.top_p, h_div_w=r.height_over_width,
                            resolution=r.resolution, request_id=r.request_id) for r in reqs]
    out = generate_infinity_reference(loaded, trs)
    return [torch.cat([pack_bits(t) for t in res.tokens]).tolist() for res in out], out


def assert_pool_empty(engine):
    s = engine.stats()
    assert s["used"] == 0 and s["requests_reserved"] == 0 and s["available_pages"] == s["num_pages"], s
    assert engine.runner._step_cond is None


def test_engine_matches_the_reference_loop_for_mixed_prompts_ratios_and_resolutions(loaded, t5_dir):
    engine = make_engine(loaded, config(t5_dir))
    assert isinstance(engine, InfinityEngine)
    reqs = requests()
    res = engine.generate(reqs)
    assert all(r.ok for r in res), [r.error for r in res]
    ref_tokens, ref = reference_tokens(loaded, t5_dir, reqs)
    for r, toks, q in zip(res, ref_tokens, ref):
        assert r.tokens == toks, r.request_id
        assert r.image.shape == q.image.shape
        assert int(abs(r.image.astype(int) - q.image.astype(int)).max()) <= 1
    sched = {r.request_id: r.stats["schedule"] for r in res}
    assert sched["r0"][-1] == [4, 4] and sched["r1"][-1] == [6, 3] and sched["r4"][-1] == [3, 6]
    assert len(sched["r3"]) == 3 and res[5].stats["h_div_w"] == 2.0
    assert res[1].image.shape == (12, 6, 3) and res[4].image.shape == (6, 12, 3)
    # one step ran scale 0 of all six requests together, so groups of several grids shared steps
    assert engine.num_steps == 4
    assert_pool_empty(engine)
    # the stored text condition: depth x 2 (k, v) x 2 rows x T x C x 4 bytes, plus small rows
    cfg = loaded.spec.model
    t = res[0].stats["text_tokens"]
    assert res[0].stats["text_condition_bytes"] >= cfg.depth * 2 * 2 * t * cfg.width * 4
    assert all(r.prompt == s["prompt"] and r.class_label is None for r, s in zip(res, MIXED))


def test_tokens_do_not_depend_on_the_batch(loaded, t5_dir):
    reqs = requests()
    together = {r.request_id: r.tokens for r in make_engine(loaded, config(t5_dir)).generate(reqs)}
    for r in reqs[:3]:
        alone = make_engine(loaded, config(t5_dir)).generate([r])[0]
        assert alone.tokens == together[r.request_id], r.request_id
    # a token cap that splits steps: requests run at different scales in one step (staggered)
    small = make_engine(loaded, config(t5_dir, max_batch_tokens=40, max_running=3))
    staggered = small.generate(reqs)
    assert {r.request_id: r.tokens for r in staggered} == together
    assert small.num_steps > 4
    assert_pool_empty(small)


def test_kv_peak_is_counted_per_step(loaded, t5_dir):
    """The reported peak is pages held at once during a step plus that step's scratch: never the
    pool's peak with the last scale's scratch added on top of it."""
    eng = make_engine(loaded, config(t5_dir))
    (res,) = eng.generate(requests()[:1])
    heads, head_dim = eng.pool.kv.shape[-2:]
    last = int(res.stats["schedule"][-1][0] * res.stats["schedule"][-1][1])
    scratch = 2 * last * 2 * heads * head_dim * eng.pool.kv.element_size()
    pool_peak = res.stats["pages_peak"] * eng.pool.page_bytes
    assert pool_peak < res.kv_peak_bytes <= pool_peak + scratch


def test_exact_reservation_queues_what_does_not_fit(loaded, t5_dir):
    # pages of one 1:1 request: 2 sequences x 2 layers x ceil((1+4+9)/4) = 16 pages at the 4th scale
    engine = make_engine(loaded, config(t5_dir))
    plan = engine.plan_for("full", 1.0)
    pages = engine.manager.request_pages(plan)
    page_bytes = engine.pool.page_bytes
    tight = make_engine(loaded, config(t5_dir, kv_pool_bytes=pages * page_bytes + page_bytes))
    res = tight.generate(requests(MIXED[:1] * 1 + [dict(prompt="a dog", seed=9)]))
    assert all(r.ok for r in res) and tight.stats()["peak_used"] <= pages
    assert res[1].stats["queue_seconds"] > 0
    assert_pool_empty(tight)
    too_small = make_engine(loaded, config(t5_dir, kv_pool_bytes=page_bytes * 4))
    r = too_small.generate([ImageRequest(prompt="a dog", request_id="x")])[0]
    assert not r.ok and "KV pages" in r.error


@pytest.mark.parametrize("kw, field, words", [
    (dict(class_label=3), "class_label", "text-to-image"),
    (dict(prompt="a dog", resolution="2M"), "resolution", "unknown resolution"),
    (dict(prompt="a dog", policy="scalekv", kv_budget=0.1), "policy", "profile_path"),
    (dict(prompt="a dog", policy="nope"), "policy", "unknown policy"),
])
def test_bad_requests_are_answered_with_the_field(loaded, t5_dir, kw, field, words):
    engine = make_engine(loaded, config(t5_dir))
    r = engine.generate([ImageRequest(request_id="x", **kw)])[0]
    assert not r.ok and field in r.fields and words in r.error, r.error
    assert_pool_empty(engine)


def test_no_text_encoder_is_a_clear_error(loaded):
    engine = make_engine(loaded, EngineConfig(dtype="float32", kv_pool_bytes=1 << 20))
    r = engine.generate([ImageRequest(prompt="a dog", request_id="x")])[0]
    assert not r.ok and "text_encoder" in r.error and r.fields == ("prompt",)


def test_validation_by_model_kind():
    job = validate_records([{"prompt": "a dog", "num": 2, "aspect_ratio": "16:9", "resolution": "0.06M"},
                            {"class_label": 3}, {"prompt": " "}, {"prompt": "x", "resolution": "3M"},
                            {"prompt": "x", "h_div_w": 2.0, "aspect_ratio": "1:1"}, {"prompt": "x", "tau": 0},
                            {"prompt": "x", "aspect_ratio": "wide"}],
                           kind="infinity", resolutions=["0.06M", "1M"])
    assert [r.request_id for r in job.requests] == ["r0-0", "r0-1"]
    assert job.requests[0].height_over_width == pytest.approx(9 / 16)
    fields = {e.record: e.fields for e in job.errors}
    assert fields == {1: ["class_label", "prompt"], 2: ["prompt"], 3: ["resolution"], 4: ["h_div_w"], 5: ["tau"],
                      6: ["aspect_ratio"]}
    var = validate_records([{"class_label": 1}, {"prompt": "a dog"}, {"class_label": 1, "tau": 1.0}], num_classes=10)
    assert len(var.requests) == 1
    assert {e.record: e.fields for e in var.errors} == {1: ["class_label", "prompt"], 2: ["tau"]}
    with pytest.raises(ValueError, match="not both"):
        ImageRequest(class_label=1, prompt="a dog")


def test_bits_pack_msb_first():
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.uint8)
    assert pack_bits(bits).tolist() == [129, 2]
    assert torch.equal(unpack_bits(pack_bits(bits), 8), bits)


def test_var_engine_refuses_prompts(micro_model):
    engine = make_engine(micro_model, EngineConfig(dtype="float32", kv_pool_bytes=1 << 20))
    r = engine.generate([ImageRequest(prompt="a dog", request_id="x")])[0]
    assert not r.ok and r.fields == ("prompt",) and "class-conditional" in r.error


def test_cli_generate_end_to_end(t5_dir, tmp_path, capsys):
    from scalekv.cli import main

    out = tmp_path / "out"
    rc = main(["generate", "--model", "infinity-micro", "--random-init", "--prompt", "a red ring",
               "--prompt", "a blue sky", "--aspect-ratio", "1:2", "--num", "2", "--text-encoder", str(t5_dir),
               "--dtype", "float32", "--block-size", "4", "--out", str(out), "--json"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["ok"] for r in recs)
    assert {r["prompt"] for r in recs} == {"a red ring", "a blue sky"}
    assert all(r["stats"]["schedule"][-1] == [6, 3] and len(r["tokens"]) == 1 + 2 + 8 + 18 for r in recs)
    from PIL import Image

    assert Image.open(out / recs[0]["png"]).size == (6, 12)  # width x height
    capsys.readouterr()
    assert main(["generate", "--model", "infinity-micro", "--random-init", "--prompt", "a dog",
                 "--out", str(out)]) == 2
    assert "--text-encoder" in capsys.readouterr().err
