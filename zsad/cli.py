"""What every command-line entry shares: user errors as one clear line (exit 2), warnings as one line each."""
from __future__ import annotations

import functools
import logging
import sys
import warnings

import click

from zsad import ZsadError


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def cli_entry(fn):
    """Decorate a click command body: ZsadError -> 'error: ...' on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _one_line_warning
        # open_clip logs its own "no pretrained weights" line on the root logger; ours says it louder and once
        logging.getLogger().setLevel(logging.ERROR)
        try:
            return fn(*args, **kwargs)
        except ZsadError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper
