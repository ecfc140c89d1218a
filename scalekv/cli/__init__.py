"""The ``scalekv`` command line: one module per group of commands, flags shared in ``args.py``.

- ``local.py``: ``generate`` (in-process engine), ``models``
- ``cluster.py``: ``submit``, ``wait``, ``jobs``, ``cancel``, ``status`` and the ``cluster`` parsers;
  ``lifecycle.py``: ``cluster start|stop``
- ``model.py``: ``train``, ``eval``, ``calibrate``
- ``bench.py``: ``bench fidelity``, ``bench load``
- ``plan.py``: ``plan`` (capacity planner); ``profile.py``: ``profile import`` (released ScaleKV budgets)
- ``serve.py``: ``serve`` (OpenAI-compatible HTTP server)

Building the parser imports no torch and no Ray (``scalekv --help`` answers in well under a
second); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from . import args as shared
from . import bench, cluster, local, model, plan, profile, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalekv", description="Serve next-scale VAR image models.",
                                     formatter_class=shared.Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local.register(sub)
    cluster.register(sub)
    model.register(sub)
    bench.register(sub)
    plan.register(sub)
    profile.register(sub)
    serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        from engine.request import field_errors

        for err in field_errors(e):
            print(f"scalekv: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"scalekv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
