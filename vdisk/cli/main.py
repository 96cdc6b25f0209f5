"""The ``vdisk`` command: its parser (the subcommands of ``images.py`` and ``control.py``) and the dispatch to
them; a vdisk error prints one line and exits non-zero.  The console script ``vdisk`` and ``python -m
vdisk.cli`` both run :func:`main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vdisk.cli import control, images
from vdisk.errors import VdiskError

DESCRIPTION = "``vdisk ...``: thin commands over the library.  Errors print one line and exit non-zero."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdisk", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    images.add_commands(sub.add_parser)
    control.add_commands(sub.add_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="vdisk: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except VdiskError as exc:
        print(f"vdisk {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

