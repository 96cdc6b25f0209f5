"""vdisk: a userspace virtual disk emulator.

qcow2 backing chains, served over NBD through nbdkit, with QEMU-style live block jobs.
"""

__version__ = "0.1.0"
