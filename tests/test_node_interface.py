"""The node interface (``vdisk.formats.node``) as each format implements it: what the block layer may rely on.

``read_mapped`` of every run ``map_units`` reports reads what ``pread`` reads; ``block_status`` and
``describe`` say what the node holds and what it is; the stream's calls have nothing to fill in a raw file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.support.commands import run

from vdisk import errors
from vdisk.block.chain import open_chain
from vdisk.formats.node import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO
from vdisk.formats.qcow2.check import check_image
from vdisk.formats.qcow2.image import Qcow2Image
from vdisk.formats.raw import RawImage

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB


def read_through_runs(node, offset: int, length: int) -> bytes:
    """The node's content as the block layer reads it: its own runs with ``read_mapped``, zeros elsewhere."""
    out = bytearray(length)
    view = memoryview(out)
    for start, run_length, kind, host in node.map_units(offset, length):
        if kind != KIND_UNALLOCATED:
            node.read_mapped(view[start - offset : start - offset + run_length], start, kind, host)
    return bytes(out)


@pytest.fixture
def qcow2_kinds(tmp_path: Path) -> Path:
    """A qcow2 image (qemu-io) with data, zero, compressed and unallocated clusters of 64 KiB."""
    path = tmp_path / "kinds.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 100k", "-c", "write -z 128k 64k",
        "-c", "write -c -P 0x22 256k 64k", "-c", "write -P 0x33 400k 7k", path)
    return path


def test_qcow2_read_mapped_of_every_run_reads_what_pread_reads(qcow2_kinds: Path):
    image = Qcow2Image.open(str(qcow2_kinds), read_only=True)
    try:
        kinds = {kind for _, _, kind, _ in image.map_units(0, image.size)}
        assert kinds == {KIND_DATA, KIND_ZERO, KIND_COMPRESSED, KIND_UNALLOCATED}
        whole = bytearray(image.size)
        image.pread(whole, 0)
        # whole disk, then pieces that start inside clusters (a compressed cluster read piece by piece)
        for offset, length in ((0, image.size), (256 * KiB + 4 * KiB, 4 * KiB), (100 * KiB - 3, 200 * KiB)):
            assert read_through_runs(image, offset, length) == whole[offset : offset + length]
    finally:
        image.close()


def test_qcow2_block_status_reports_host_offsets_only_where_known(qcow2_kinds: Path):
    image = Qcow2Image.open(str(qcow2_kinds), read_only=True)
    try:
        for status in image.block_status(0, image.size):
            if status.kind == KIND_DATA:
                assert status.host and not status.zero
            elif status.kind == KIND_COMPRESSED:
                assert status.host is None and not status.zero
            elif status.kind == KIND_ZERO:
                assert status.zero
        assert sum(s.length for s in image.block_status(0, image.size)) == image.size
    finally:
        image.close()


def test_qcow2_describes_its_backing_file_and_format(tmp_path: Path):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    RawImage.create(str(base), MiB)
    Qcow2Image.create(str(top), MiB, cluster_size=4096, backing_file="base.raw", backing_format="raw")
    chain = open_chain(str(top), read_only=True)
    try:
        image = chain.top
        assert (image.backing_name, image.backing_format) == ("base.raw", "raw")
        facts = image.describe()
        assert facts["cluster-size"] == 4096
        assert (facts["backing-filename"], facts["backing-filename-format"]) == ("base.raw", "raw")
        assert facts["format-specific"]["data"]["compat"] == "1.1" and facts["dirty-flag"] is False
        assert image.below is not None and chain.nodes[1].describe() == {}
    finally:
        chain.close()


def test_qcow2_partially_allocated_names_clusters_with_unallocated_subclusters(tmp_path: Path):
    path = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "4M")
    # one 2 KiB subcluster of cluster 1 (qemu-io writes subclusters; vdisk's own writes fill whole clusters)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 68k 2k", "-c", "write -P 0x45 192k 64k", path)
    image = Qcow2Image.open(str(path))
    try:
        assert image.partially_allocated(0, 4 * MiB) == [1]
        assert image.unallocated_clusters(0, 4).tolist() == [True, False, True, False]
    finally:
        image.close()


def test_raw_maps_data_and_holes_and_reads_them_through_read_mapped(tmp_path: Path):
    path = tmp_path / "disk.raw"
    RawImage.create(str(path), MiB)
    with open(path, "r+b") as f:
        f.seek(256 * KiB)
        f.write(b"\x66" * (64 * KiB))
    image = RawImage.open(str(path))
    try:
        assert image.backing_name is None and image.backing_format is None and image.below is None
        whole = bytearray(MiB)
        image.pread(whole, 0)
        assert read_through_runs(image, 0, MiB) == whole
        statuses = image.block_status(0, MiB)
        assert all(s.host == s.start for s in statuses)  # the identity, 0 included
        assert [(s.kind, s.zero) for s in statuses if s.start <= 256 * KiB < s.start + s.length] == [(KIND_DATA, False)]
        assert image.describe() == {}
        assert not image.unallocated_clusters(0, 16).any() and image.partially_allocated(0, MiB) == []
    finally:
        image.close()


def test_raw_refuses_to_be_populated_or_rebased(tmp_path: Path):
    path = tmp_path / "disk.raw"
    RawImage.create(str(path), MiB)
    image = RawImage.open(str(path))
    try:
        with pytest.raises(errors.UnsupportedFeature, match="raw"):
            image.populate(0, bytearray(64 * KiB), np.ones(1, dtype=bool), np.zeros(1, dtype=bool))
        with pytest.raises(errors.UnsupportedFeature, match="raw"):
            image.set_backing("base.qcow2", "qcow2")
    finally:
        image.close()
    assert os.path.getsize(path) == MiB


def test_check_refuses_to_repair_an_image_opened_read_only(qcow2_kinds: Path):
    image = Qcow2Image.open(str(qcow2_kinds), read_only=True)
    try:
        assert check_image(image).exit_code == 0
        with pytest.raises(errors.ReadOnlyError):
            check_image(image, repair="leaks")
    finally:
        image.close()
