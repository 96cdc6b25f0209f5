"""Helpers for the crash, power-loss and out-of-space tests (tests/test_crash.py, test_powerloss.py, test_enospc.py).

``model``: what a guest may find on its disk after a crash (per byte: the last durable value, or the value of
any write not yet made durable), and a libnbd client doing random mixed I/O against it.
``replay``: reads a ``vdisk.io.iolog`` recording and builds the images a power loss could leave behind.
"""
