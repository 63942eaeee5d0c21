"""`anorefiner --help` describes every subcommand; `run --help` every option (issue 18, item 7)."""

import importlib

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
