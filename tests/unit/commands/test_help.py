"""`anorefiner --help` describes every subcommand; `run --help` every option (issue 18, item 7)."""

import importlib
import re

import pytest

from anorefiner.cli import COMMANDS, main


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_top_level_help_describes_each_subcommand(capsys):
    text = _help(capsys)
    for module_name in COMMANDS.values():
        first_words = " ".join(importlib.import_module(f"anorefiner.commands.{module_name}").HELP.split()[:4])
        assert first_words in text, module_name
    assert "--help'" not in text


def test_run_help_documents_every_option(capsys):
    text = _help(capsys, "run")
    for option, words in (("--category", "category folder"), ("--backbone", "feature extractor"),
                          ("--seed", "seed of every random step")):
        assert f"{option} " in text and words in text



def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_]+", text))


def test_backend_choices_in_help_come_from_the_registry(capsys):
    """Every registered backend type is named where a command takes one (issue 28, item 5)."""
    from anorefiner.tta import METHODS
    from anorefiner.zsad import PRESETS
    from anorefiner.zsad.registry import BACKEND_TYPES, REFINABLE_TYPES, TRAINED_TYPES, TTA_TYPES

    assert set(BACKEND_TYPES) == {kind for kind, _ in PRESETS.values()}
    top, coarse = _help(capsys), _words(_help(capsys, "coarse"))
    from anorefiner.commands.coarse import HELP

    assert " ".join(HELP.split()) in top and set(BACKEND_TYPES) <= _words(HELP)  # anorefiner --help, coarse line
    assert set(BACKEND_TYPES) | set(PRESETS) <= coarse  # --backend-type choices, --backend-name presets
    refinable = {name for name, (kind, _) in PRESETS.items() if kind in REFINABLE_TYPES}
    for command, option in (("run", "--backend BACKEND"), ("pgt", "--backend-name BACKEND_NAME")):
        text = _help(capsys, command).split(f"{option} ")[-1].split(" --")[0]
        assert _words(text) & set(PRESETS) == refinable, command  # all the presets PGT refines, no other
    tta = _help(capsys, "tta")
    assert "{" + ",".join(TTA_TYPES) + "}" in tta and "{" + ",".join(METHODS) + "}" in tta
    assert set(METHODS) <= _words(top)  # the one-line HELP of tta names each method
    assert "{" + ",".join(TRAINED_TYPES) + "}" in _help(capsys, "train-backend")
    assert all(BACKEND_TYPES[kind].paper.split(" (")[0] in top for kind in TRAINED_TYPES)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help(command):
    """No option without a help text (``features --batch-size/--dtype`` had none)."""
    from anorefiner.cli import build_parser

    parser = build_parser(only=command)._subparsers._group_actions[0].choices[command]
    assert [a.option_strings or a.dest for a in parser._actions if not a.help] == []
