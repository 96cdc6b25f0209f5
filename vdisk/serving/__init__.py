"""The serving process: nbdkit loads ``nbdkit_plugin.py``, which drives the process state; ``launcher.py``
builds nbdkit's command line."""
