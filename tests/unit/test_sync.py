"""Host-device syncs per engine step: lengths stay host ints, tables are built once per step and
sampling copies tokens out once, so a step at mixed scales reads back from the device at most
twice (on CPU: counted calls of ``tolist`` / ``item`` / ``cpu``; on CUDA: the sync debug mode)."""

from __future__ import annotations

import pytest
import torch

from engine.api import EngineConfig, ImageEngine
from engine.request import ImageRequest

MAX_SYNCS_PER_STEP = 2


def _reqs(n: int, seed0: int = 0) -> list[ImageRequest]:
    return [ImageRequest(class_label=i % 10, seed=seed0 + i, cfg=2.0, top_k=8, top_p=0.9, request_id=f"s{seed0 + i}")
            for i in range(n)]


def _engine_at_mixed_scales(model, device: str = "cpu") -> ImageEngine:
    """An engine whose running requests sit at two different scales, none about to finish."""
    eng = ImageEngine(model, EngineConfig(dtype="float32", block_size=4))
    for k in range(2):
        for r in _reqs(2, seed0=10 * k):
            eng.add_request(r)
        eng.step()
    assert len({st.scale for st in eng.running}) == 2
    assert all(st.scale < model.spec.var.num_scales - 1 for st in eng.running)
    return eng


def test_a_mixed_scale_step_reads_back_from_the_device_at_most_twice(micro_model, monkeypatch):
    eng = _engine_at_mixed_scales(micro_model)
    calls: dict[str, int] = {"tolist": 0, "item": 0, "cpu": 0}
    for name in calls:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    out = eng.step()
    monkeypatch.undo()
    assert out == []  # nothing finished: this is the hot loop only
    assert sum(calls.values()) <= MAX_SYNCS_PER_STEP, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode counts "
                                                          "real host-device syncs; CPU runs the counter test above")
def test_cuda_step_syncs(micro_model):  # pragma: no cover - CPU-only CI
    import copy

    model = copy.deepcopy(micro_model)
    model.var.cuda()
    model.vae.cuda()
    eng = _engine_at_mixed_scales(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng.step()
    torch.cuda.set_sync_debug_mode("default")
    syncs = [x for x in w if "synchroniz" in str(x.message)]
    assert len(syncs) <= MAX_SYNCS_PER_STEP, [str(x.message) for x in syncs]
