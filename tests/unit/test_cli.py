"""The command line: quick commands import no torch, every flag's default is in --help, class
names work, and shared flags mean the same everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scalekv.cli import build_parser, main


def _run_isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter (so modules imported by earlier tests do not count)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout


@pytest.mark.parametrize("argv", [["--help"], ["submit", "no-such-file.jsonl", "--out", "x"], ["models", "--help"],
                                  ["status", "--help"], ["cluster", "stop", "--help"]])
def test_quick_commands_do_not_import_torch(argv):
    out = _run_isolated(
        "import sys\nfrom scalekv.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    assert out.strip().endswith("NO-TORCH")


def _subparsers(parser):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_default_is_shown_in_help():
    for name, sub in _subparsers(build_parser()):
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.help:
                assert "default" in (action.help % {"default": action.default} if "%(" in action.help else
                                     sub._get_formatter()._get_help_string(action)), (name, action.dest)
        assert "usage" in text


def test_shared_flags_have_one_default_everywhere():
    seen: dict[str, set] = {}
    for _name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            for flag in action.option_strings:
                if flag in ("--dtype", "--kv-budget", "--policy", "--threads", "--model", "--json"):
                    seen.setdefault(flag, set()).add(repr(action.default))
    assert seen["--dtype"] == {"'auto'"}
    assert seen["--kv-budget"] == {"None"}  # every command takes the engine's default (1.0)
    assert seen["--json"] == {"False"}  # a flag: print JSON on stdout, never a file name
    assert seen["--model"] <= {"'var-tiny'", "None"}  # the default model, or required where it must be named


def test_list_classes_and_class_names(tmp_path, capsys):
    assert main(["generate", "--model", "var-tiny", "--list-classes", "--json"]) == 0
    classes = json.loads(capsys.readouterr().out)["classes"]
    assert classes[7] == "ring-striped" and len(classes) == 10
    assert main(["generate", "--model", "var-micro", "--random-init", "--class", "ring-striped", "--out",
                 str(tmp_path)]) == 2
    assert "class name 'ring-striped' needs a model with named classes" in capsys.readouterr().err
