"""``scalekv profile import``: a budget file of the ScaleKV release -> this project's scale profile.

The released files (``"Scale 9"`` ... ``"Scale 13"``, a drafter flag per block, ``High`` /
``Max`` / ``Min`` / ``Limit``) become a ``ScaleProfile`` with exact per-scale capacities
(``memory.profile_import``), which the engine replays when it runs ``scalekv`` at the file's
budget (``--profile-path PROFILE.json --kv-budget 0.1``) and ``scalekv plan`` plans with.

"""

from __future__ import annotations

import argparse
import json
import sys

from . import args as shared


def register(sub: argparse._SubParsersAction) -> None:
    from engine.shapes import model_shapes

    p = shared.add_parser(sub, "profile", "scale profiles: import released ScaleKV budget files", description=__doc__)
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")
    i = shared.add_parser(psub, "import", "import a released ScaleKV budget JSON as a scale profile")
    i.add_argument("budget_file", help="the released budget JSON (\"Scale N\" entries)")
    i.add_argument("--model", required=True, choices=sorted(model_shapes()), metavar="MODEL",
                   help=f"the model the file is for ({', '.join(sorted(model_shapes()))})")
    i.add_argument("--out", required=True, help="profile JSON to write")
    i.add_argument("--max-capacity", type=int, default=None,
                   help="the released max_capacity (tokens a cache holds before compression starts; default: "
                        "inferred from the file's totals, N_d x Max + N_r x Min = depth x max_capacity)")
    i.add_argument("--budget", type=float, default=None,
                   help="nominal budget of the file, e.g. 0.1 (default: max_capacity / T to the nearest percent)")
    i.add_argument("--resolution", type=int, default=None,
                   help="pixels of the (square, 1:1) schedule the file is for (default: the model's largest)")
    shared.add_json(i, "the import report")
    i.set_defaults(func=cmd_profile_import)


def cmd_profile_import(args: argparse.Namespace) -> int:
    from engine.shapes import get_shape
    from memory.profile_import import load_released_budgets

    shape = get_shape(args.model)
    grid = [h for h, w in shape.schedule(args.resolution, "1:1")]
    profile, report = load_released_budgets(args.budget_file, args.model, grid, shape.depth,
                                            args.max_capacity, args.budget)
    profile.save(args.out)
    if args.json:
        print(json.dumps({"out": args.out, **report.to_dict()}))
    else:
        first = report.json_scales[0]
        print(f"wrote {args.out}: {args.model}, budget {report.budget:g} (max_capacity {report.base_capacity} tokens "
              f"per layer), \"Scale {first}\"..\"Scale {report.json_scales[-1]}\" -> scales "
              f"{report.reader_scales[0]}..{report.reader_scales[-1]}; caches whole through scale index "
              f"{report.first_compressed_scale - 1}")
        for k in report.reader_scales:
            print(f"  scale {k:2d}: drafters {list(profile.drafters[k])}, total {report.totals[k]} tokens")
    for line in report.warnings + report.limit_mismatches:
        print(f"warning: {line}", file=sys.stderr)
    return 0
