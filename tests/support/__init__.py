"""Helpers shared by the test files; ``tests/conftest.py`` keeps only pytest fixtures and hooks.

``commands``: running programs, and the vdisk CLI as a subprocess or in this process.
``images``: what qemu-img says about an image (check, compare, convert, info, map) and the chain tests share.
``serving``: a real ``vdisk serve`` process for the length of a ``with`` block, and the nbdkit it runs.
``qmp``: a qemu.qmp session to a monitor that records its events, and the runner for asyncio scenarios.
``powerloss``: the crash and power-loss model and the I/O log replay (its own ``__init__`` says more).
"""
