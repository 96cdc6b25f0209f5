"""Images as qemu-img sees them (check, compare, convert to raw, info, map), and the chain the tests share."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.commands import run


def qemu_img_check(path: Path | str) -> dict:
    """qemu-img check --output=json; -U so it also works on an image being served."""
    proc = run("qemu-img", "check", "-U", "--output=json", path, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def assert_clean(path: Path | str) -> None:
    result = qemu_img_check(path)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0 and result["check-errors"] == 0, result


def qemu_img_compare(a: Path | str, b: Path | str, fmt_a: str = "qcow2", fmt_b: str = "raw") -> bool:
    proc = run("qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def qemu_raw(path: Path | str, out: Path | str) -> bytes:
    run("qemu-img", "convert", "-U", "-O", "raw", path, out)
    return Path(out).read_bytes()


def chain_info(path: Path | str) -> list[dict]:
    """``qemu-img info --backing-chain`` as JSON: the active image first."""
    return json.loads(run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path).stdout)


def qemu_map(path: Path | str) -> list[dict]:
    """``qemu-img map --output=json`` of the chain rooted at ``path``."""
    return json.loads(run("qemu-img", "map", "-U", "--output=json", path).stdout)


def file_digest(path: Path | str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_chain4(directory: Path) -> dict[str, Path]:
    """The brief's chain [A] -> [B] -> [C] -> [D], 8 MiB, made by qemu-img/qemu-io, with relative names.

    A holds pattern 0xA1 in its first half, B rewrites clusters with 0xB2 and zeroes one, C writes 0xC3 and
    a compressed cluster; D (active) is empty.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.qcow2" for name in "ABCD"}
    run("qemu-img", "create", "-q", "-f", "qcow2", paths["A"], "8M")
    run("qemu-io", "-c", "write -P 0xa1 0 4M", paths["A"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", paths["B"])
    run("qemu-io", "-c", "write -P 0xb2 1M 1M", "-c", "write -z 3M 64k", "-c", "write -P 0xb3 6M 512k", paths["B"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", paths["C"])
    run("qemu-io", "-c", "write -P 0xc3 1536k 256k", "-c", "write -c -P 0xc4 7M 64k", paths["C"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "C.qcow2", "-F", "qcow2", paths["D"])
    return paths
