"""Flags shared by several ``scalekv`` commands, each declared once with one default.

Every command's parser uses ``Formatter``, which shows the default of every flag in ``--help``.
``--json`` means the same everywhere: print machine-readable JSON on stdout instead of text
(files are written with ``--out`` / ``--report``). Nothing here imports torch, so quick
commands (``--help``, ``status``, ``cluster stop``, argument errors) stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from engine.config import DTYPES, EngineConfig, parse_bytes
from engine.models.catalog import DEFAULT_MODEL, INFINITY_MODELS, MODELS


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's help ends with its default (unless it is unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=kw.pop("description", help), formatter_class=Formatter, **kw)


def add_model_args(p: argparse.ArgumentParser, infinity: bool = False) -> None:
    """Which model and weights: ``--model``, ``--checkpoint``, ``--tokenizer``, ``--random-init``.
    ``infinity``: the command also serves the text-to-image Infinity models."""
    g = p.add_argument_group("model")
    names = sorted(MODELS) + (sorted(INFINITY_MODELS) if infinity else [])
    g.add_argument("--model", default=DEFAULT_MODEL, choices=names, help="named model config")
    extra = " (Infinity: the released transformer .pth, or the directory of 8B shards)" if infinity else ""
    g.add_argument("--checkpoint", default=None,
                   help="transformer weights (.safetensors or official .pth), or a directory holding "
                        "transformer.safetensors + tokenizer.safetensors; default: the shipped weights" + extra)
    g.add_argument("--tokenizer", default=None, help="tokenizer weights (with a transformer --checkpoint file)")
    g.add_argument("--random-init", action="store_true",
                   help="allow random weights when no checkpoint is given (tests, benchmarks of shapes)")


def add_threads(p: argparse.ArgumentParser, help: str = "torch CPU threads (default: all cores)") -> None:
    p.add_argument("--threads", type=int, default=None, help=help)


def add_dtype(p: argparse.ArgumentParser) -> None:
    f = next(f for f in dataclasses.fields(EngineConfig) if f.name == "dtype")
    p.add_argument("--dtype", default=f.default, choices=list(DTYPES), help=f.metadata["help"])


def add_json(p: argparse.ArgumentParser, what: str = "results") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout instead of text")


def add_engine_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``EngineConfig`` field (``--kv-pool-bytes`` ...). Defaults are left unset
    (None) so ``EngineConfig.from_values`` can tell a flag from the environment; ``--help``
    shows the field's default."""
    g = p.add_argument_group("engine (also SCALEKV_<FIELD> environment variables)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        if f.name == "dtype":
            add_dtype(g)
            continue
        kind = str(f.type)
        typ = (lambda s, n=f.name: parse_bytes(s, n)) if f.metadata.get("parse") == "bytes" else \
            float if "float" in kind else int if "int" in kind else str
        shown = "" if f.default is None else f" (default: {f.default})"
        g.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None, choices=f.metadata.get("choices"),
                       help=f.metadata["help"] + shown)


def add_cluster_target(p: argparse.ArgumentParser) -> None:
    """Which cluster: ``--address``, ``--name`` (the scheduler) and ``--namespace``. Without
    --address, the cluster recorded in $SCALEKV_STATE_DIR/cluster.json; with neither, the
    command fails at once (never Ray's 'auto', which finds any Ray instance on the machine)."""
    p.add_argument("--address", default=None,
                   help="Ray cluster HOST:PORT (default: the one `scalekv cluster start` recorded in "
                        "$SCALEKV_STATE_DIR/cluster.json, default ~/.scalekv)")
    p.add_argument("--name", default=None, help="scheduler actor name (default: the recorded one, else "
                                                 "scalekv-scheduler)")
    p.add_argument("--namespace", default=None, help="Ray namespace of the scheduler (default: the recorded one, "
                                                      "else scalekv)")


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def class_label(text: str) -> int | str:
    """``--class 3`` or ``--class ring-striped`` (resolved against the model later)."""
    return int(text) if text.lstrip("-").isdigit() else text


def float_list(text: str) -> list[float]:
    """``0.04,0.1,0.2`` -> [0.04, 0.1, 0.2] (``--budgets``)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def policy_list(text: str) -> list[str]:
    """``full,scalekv`` -> ["full", "scalekv"], each a known policy (``--policies``)."""
    from memory.policy_names import POLICIES

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown policies {bad} (available: {', '.join(POLICIES)})")
    return names



def fail(msg: str) -> int:
    """Print a CLI error and return exit code 2 (bad input, or no cluster to act on)."""
    print(f"scalekv: error: {msg}", file=sys.stderr)
    return 2
