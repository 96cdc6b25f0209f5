"""Running programs with their output captured, and the vdisk CLI as a subprocess or in this process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VDISK = [sys.executable, "-m", "vdisk.cli"]


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, text output; on failure the assertion shows what it printed."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def vdisk(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(*VDISK, *args, check=check, cwd=ROOT)


def vdisk_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """``vdisk ARGS`` run in this process (no interpreter start-up): exit code and captured output.

    An exception that escapes ``cli.main`` (what would be a traceback) fails the calling test.
    """
    from vdisk.cli import main as cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["vdisk", *args], code, captured.out, captured.err)
