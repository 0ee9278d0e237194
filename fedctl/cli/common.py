"""Shared CLI plumbing: logging setup (the inputs the commands check are in :mod:`fedctl.api.inputs`)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def setup_logging(verbose: int, quiet: bool = False) -> None:
    """Log to stderr: INFO by default, DEBUG with -v, WARNING with --quiet; rich formatting on a terminal."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    if sys.stderr.isatty() and not os.environ.get("FEDCTL_PLAIN_LOGS"):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[handler], force=True)


