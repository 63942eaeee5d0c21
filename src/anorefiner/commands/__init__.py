"""One module per ``anorefiner`` subcommand (see :mod:`anorefiner.cli`)."""
