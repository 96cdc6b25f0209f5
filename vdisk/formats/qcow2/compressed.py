"""Compressed qcow2 clusters: find the compressed bytes an L2 entry names and decompress them, bounded.

Hostile images get no more than one cluster out of any entry: a zstd frame is never decompressed whole (a
few KiB can expand to gigabytes), and anything that does not decompress to exactly one cluster is a
``CorruptImage``.  The last cluster read is kept, so the reads of one cluster piece by piece (4 KiB guest
reads, a partial write's copy-on-write) decompress it once.
"""

from __future__ import annotations

import zlib

from vdisk.errors import CorruptImage
from vdisk.formats.qcow2 import format as fmt
from vdisk.formats.qcow2.file import ImageFile


class CompressedClusters:
    """Reads compressed clusters of one image (zlib or zstd, as its header says)."""

    def __init__(self, file: ImageFile):
        self.file = file
        self._last: tuple[int, bytes] | None = None  # (L2 entry, its cluster)
        if file.header.compression_type == fmt.COMPRESSION_ZSTD:
            import zstandard  # only images that use zstd need the module

            self._zstd = zstandard.ZstdDecompressor()

    def read(self, entry: int) -> bytes:
        """The whole cluster that the compressed L2 ``entry`` describes."""
        last = self._last
        if last is not None and last[0] == entry:
            return last[1]
        cs = self.file.cluster_size
        host, length = fmt.compressed_extent(entry, self.file.cluster_bits)
        raw = self.file.pread(length, host)
        path = self.file.path
        try:
            if self.file.header.compression_type == fmt.COMPRESSION_ZSTD:
                # One byte past the cluster tells a frame that is too long, which QEMU's
                # qcow2_zstd_decompress refuses (EIO).
                data = self._zstd.stream_reader(raw).read(cs + 1)
            else:
                data = zlib.decompressobj(-12).decompress(raw, cs)
        except Exception as exc:  # zlib.error / zstd.ZstdError: both are "this cluster is garbage"
            raise CorruptImage(f"compressed cluster does not decompress: {exc}", path=path, offset=host) from exc
        if len(data) > cs:
            raise CorruptImage(f"compressed cluster decompresses to more than {cs} bytes", path=path, offset=host)
        if len(data) < cs:
            raise CorruptImage(f"compressed cluster decompresses to {len(data)} bytes, not {cs}", path=path,
                               offset=host)
        self._last = (entry, data)
        return data
