"""The ``vdisk`` command: image tools (create, info, map, check) and the control of a running server."""
