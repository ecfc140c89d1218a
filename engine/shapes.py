"""Model shapes for capacity planning (``memory.planner.ModelShape``), torch-free.

The VAR models come from the catalog (``engine.models.catalog``). The Infinity family is
described here from its published facts until its configs land in the catalog; then
``INFINITY_SHAPES`` should be derived from them the way ``_var_shape`` adapts a ``ModelSpec``.

Infinity facts (text-to-image, bitwise tokenizer, 1024 px class):

- Infinity-2B: 32 blocks, width 2048, 16 heads x 128, FFN 8192; 2.205 B parameters.
- Infinity-8B: 40 blocks, width 3584, 28 heads x 128, FFN 14336; 8.376 B parameters.
- Every block: self-attention (K/V cached), cross-attention to the Flan-T5-XL prompt
  encoding (keys/values projected from the text at every scale, not cached), FFN. The head
  gives 2 logits per bit: 64 per token on 2B (32 bits), 112 on 8B (56 bits).
- Classifier-free guidance runs a conditional and an unconditional row per image.
- Cached K is float32 and V bfloat16 (cosine attention normalises K in float32 under autocast).
- Schedules: 13 scales at "1M" (about 1024 x 1024), per aspect ratio h:w; the lower
  resolutions run the first 12 ("0.60M", 768 px at 1:1), 10 ("0.25M", 512 px) or 7 ("0.06M",
  256 px) scales of the same list. Ratios below 1 are the transposed lists.
- The text encoder (Flan-T5-XL's encoder, about 1.22 B parameters: 24 layers, d_model 2048,
  gated FFN 5120, 32k vocabulary) stays resident; it is counted in ``aux_params``.

The released ScaleKV budgets for 1024 x 1024 at 1:1 ("10%": 650 tokens per layer) are kept as
data (``RELEASED_10PCT``) in the released file format, so that ``released_profile`` builds the
profiles through the same importer a user runs on the files themselves.
"""

from __future__ import annotations

from memory.planner import ModelShape
from memory.profile import ScaleProfile

from .models.catalog import MODELS

# (h, w) per scale at "1M", height:width ratios >= 1; the others are these transposed.
_INFINITY_1M: dict[str, tuple[tuple[int, int], ...]] = {
    "1:1": ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    "5:4": ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    "4:3": ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    "3:2": ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    "7:4": ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    "2:1": ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    "5:2": ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    "3:1": ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}


def _infinity_schedules() -> tuple[tuple[str, tuple[tuple[int, int], ...]], ...]:
    out = []
    for name, sched in _INFINITY_1M.items():
        out.append((name, sched))
        if name != "1:1":
            h, w = name.split(":")
            out.append((f"{w}:{h}", tuple((b, a) for a, b in sched)))
    return tuple(out)


INFINITY_SCHEDULES = _infinity_schedules()
INFINITY_RESOLUTIONS = ((256, 7), (512, 10), (768, 12), (1024, 13))
# The released max_capacity per nominal budget (1024 x 1024, 1:1; T = 6425).
INFINITY_NAMED_BUDGETS = ((0.04, 265), (0.10, 650), (0.20, 1300))
T5_XL_ENCODER_PARAMS = 1_220_000_000


def _infinity(name: str, depth: int, heads: int, ffn: int, bits: int, params: int) -> ModelShape:
    return ModelShape(
        name=name, family="infinity", depth=depth, num_heads=heads, head_dim=128, mlp_hidden=ffn,
        schedules=INFINITY_SCHEDULES, resolutions=INFINITY_RESOLUTIONS, cfg_rows=2, head_out=2 * bits,
        cross_attention=True, text_tokens=64, num_params=params, aux_params=T5_XL_ENCODER_PARAMS,
        k_dtype="float32", v_dtype="bfloat16", named_budgets=INFINITY_NAMED_BUDGETS,
        notes="published Infinity shapes (not yet in the model catalog)",
    )


INFINITY_SHAPES: dict[str, ModelShape] = {
    "infinity-2b": _infinity("infinity-2b", 32, 16, 8192, 32, 2_205_000_000),
    "infinity-8b": _infinity("infinity-8b", 40, 28, 14336, 56, 8_376_000_000),
}


def _var_params(depth: int, width: int, mlp: int, vocab: int, classes: int, tokens: int, z: int) -> int:
    """VAR transformer parameters: per block QKV + proj + FFN + AdaLN (6C x C), embeddings, head."""
    c = width
    block = 4 * c * c + 2 * c * mlp + 6 * c * c + 3 * c + mlp + c + 6 * c + 2 * c
    return depth * block + (classes + 1) * c + tokens * c + z * c + 2 * c * c + vocab * c + vocab


def _var_shape(name: str) -> ModelShape:
    spec = MODELS[name]
    v = spec.var
    mlp = int(v.width * v.mlp_ratio)
    sched = tuple((p, p) for p in v.patch_nums)
    return ModelShape(
        name=name, family="var", depth=v.depth, num_heads=v.num_heads, head_dim=v.head_dim, mlp_hidden=mlp,
        schedules=(("1:1", sched),), resolutions=((spec.vae.image_size, len(sched)),), cfg_rows=2,
        head_out=v.vocab_size, num_params=_var_params(v.depth, v.width, mlp, v.vocab_size, v.num_classes,
                                                      v.seq_len, v.z_channels),
        k_dtype="bfloat16", v_dtype="bfloat16", notes=spec.notes,
    )


def model_shapes() -> dict[str, ModelShape]:
    """Every plannable model: the catalog's VAR models, then the Infinity family (a catalog
    entry of the same name wins once it exists)."""
    out = {name: _var_shape(name) for name, spec in MODELS.items() if hasattr(spec, "var")}
    for name, shape in INFINITY_SHAPES.items():
        out.setdefault(name, shape)
    return out


def get_shape(name: str) -> ModelShape:
    shapes = model_shapes()
    try:
        return shapes[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; plannable models: {', '.join(sorted(shapes))}") from None


# ------------------------------------------------------------------ released ScaleKV budgets
def _released(depth: int, rows: list[tuple[int, tuple[int, ...], int, int, int]]) -> dict:
    """A budget file in the released format from (JSON scale, drafters, Max, Min, Limit) rows."""
    out = {}
    for scale, drafters, cap_max, cap_min, limit in rows:
        entry: dict[str, int] = {f"Block {b}": int(b in drafters) for b in range(depth)}
        entry.update({"High": len(drafters), "Max": cap_max, "Min": cap_min, "Limit": limit})
        out[f"Scale {scale}"] = entry
    return out


RELEASED_10PCT: dict[str, dict] = {
    "infinity-2b": _released(32, [(9, (0, 23), 920, 632, 921), (10, (0, 23), 1490, 594, 1496),
                                  (11, (0, 23), 2510, 526, 2514), (12, (0, 23), 4100, 420, 4110),
                                  (13, (0,), 6385, 465, 6404)]),
    "infinity-8b": _released(40, [(9, (0, 1, 2), 909, 629, 921), (10, (0, 1, 2), 1464, 584, 1485),
                                  (11, (0, 1, 2), 2463, 503, 2488), (12, (0, 1, 2), 4054, 374, 4063),
                                  (13, (0, 1, 2), 6200, 200, 6358)]),
}


def released_profile(name: str) -> ScaleProfile:
    """The released 10% budgets of an Infinity model as a profile with capacities (1024 px,
    1:1). Scales the file does not cover take its first scale's drafters, so that other
    budgets (4% compresses from one scale earlier) split with the same drafter layers."""
    from dataclasses import replace

    from memory.profile_import import import_released_budgets

    shape = get_shape(name)
    if name not in RELEASED_10PCT:
        raise ValueError(f"no released ScaleKV budgets for {name!r} (known: {', '.join(RELEASED_10PCT)})")
    grid = [h for h, _ in shape.schedule(1024, "1:1")]
    prof, _ = import_released_budgets(RELEASED_10PCT[name], name, grid, shape.depth, budget=0.1,
                                      source="released ScaleKV 10% budgets")
    first = next(k for k, row in enumerate(prof.drafters) if row)
    drafters = tuple(prof.drafters[first] if 0 < k < first else row for k, row in enumerate(prof.drafters))
    return replace(prof, drafters=drafters)


def shipped_profile_file(name: str):
    """Where a model's shipped scale profile lives: the place ``registry.shipped_profile_path``
    names, computed here without importing torch."""
    from pathlib import Path

    from memory.profile import PROFILE_FILE

    return Path(__file__).resolve().parent / "models" / "weights" / name / PROFILE_FILE


def default_profile(name: str) -> ScaleProfile | None:
    """The scale profile planning uses for ``scalekv``: the model's shipped one, else the
    released budgets (Infinity), else None."""
    path = shipped_profile_file(name)
    if path.exists():
        return ScaleProfile.load(path)
    if name in RELEASED_10PCT:
        return released_profile(name)
    return None
