"""Logging: every line once, the package's and the dependencies' through one handler."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_each_line_is_printed_once_next_to_root_warnings():
    code = ("from anorefiner.log import LOG, setup_logging\nimport logging\nsetup_logging()\nsetup_logging()\n"
            "LOG.info('first line')\nlogging.warning('a dependency warns')\nLOG.info('second line')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("first line") == 1 and err.count("second line") == 1 and err.count("a dependency warns") == 1
    assert "INFO anorefiner: first line" in err


def test_package_lines_reach_caplog(caplog):
    from anorefiner.log import LOG, setup_logging

    setup_logging()
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        LOG.info("captured")
    assert "captured" in caplog.text
