"""Disk formats: one node per image file (qcow2, raw), behind the node interface of ``node.py``.  No format
knows it has a backing file; the block layer (``vdisk.block``) walks the chain."""
