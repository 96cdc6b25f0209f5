"""cffi build script for ``vdisk._copier`` (API mode, out-of-line).

Used two ways:

* by setuptools, through ``cffi_modules=["native/build_copier.py:ffibuilder"]`` in ``setup.py``
  (``pip install -e .`` builds the extension in place);
* standalone, ``python native/build_copier.py``, which builds ``vdisk/_copier.abi3.so`` in place in the
  source tree (handy after editing the C sources without reinstalling).

cffi API mode releases the GIL around every call into the library; the C functions never touch Python
objects, so that is safe and lets I/O and scans run beside the other threads.
"""

from __future__ import annotations

import glob
import os
import warnings

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Paths relative to the project root: setuptools runs this script with the root as the working
# directory, and build_in_place() changes into the root first.
SOURCES = ["native/copier.c"]
HEADERS = ["native/copier.h"]

# Keep in sync with native/copier.h (declarations only, no macros).
CDEF = """
int vdisk_version(void);
int vdisk_zero_map(const uint8_t *buf, size_t len, size_t cluster_size, uint8_t *out);
int vdisk_pread_full(int fd, uint8_t *buf, size_t len, uint64_t offset);
int vdisk_pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t offset);
int vdisk_pwrite_selected(int fd, const uint8_t *buf, size_t cluster_size, const uint8_t *select, size_t n,
                          uint64_t host_offset);
int vdisk_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len,
                     uint8_t *bounce, size_t bounce_len);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vdisk._copier",
    '#include "copier.h"',
    sources=SOURCES,
    depends=HEADERS,
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)


def build_in_place() -> str:
    """Build ``vdisk/_copier*.so`` in the source tree the way ``pip install -e .`` does.

    This goes through setuptools' ``build_ext --inplace`` with the same ``cffi_modules`` entry as
    ``setup.py`` rather than ``ffibuilder.compile()``: both then produce the same file name
    (``_copier.abi3.so``), so a standalone build can never leave a second, differently named ``.so`` that
    shadows the one pip builds.
    """
    from setuptools import Distribution

    os.chdir(ROOT)
    dist = Distribution({"name": "vdisk", "cffi_modules": ["native/build_copier.py:ffibuilder"]})
    build_ext = dist.get_command_obj("build_ext")
    build_ext.inplace = True
    build_ext.force = True
    with warnings.catch_warnings():
        # Creating build_ext pulls in setuptools' install command, which warns about `setup.py install`.
        warnings.filterwarnings("ignore", message=".*setup.py install is deprecated")
        dist.run_command("build_ext")
    [extension] = build_ext.extensions
    output = os.path.abspath(build_ext.get_ext_fullpath(extension.name))
    # A differently named build of the same module (e.g. _copier.cpython-311-*.so from ffibuilder.compile())
    # would take precedence over this one at import: remove it.
    for other in glob.glob(os.path.join(os.path.dirname(output), "_copier.*.so")):
        if os.path.abspath(other) != output:
            os.unlink(other)
            print(f"removed {other}, which would shadow {output}")
    return output


if __name__ == "__main__":
    print(build_in_place())
