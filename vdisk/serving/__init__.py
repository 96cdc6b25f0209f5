"""The serving process: nbdkit loads ``nbdkit_plugin.py``, which drives the run states of ``process.py``;
``config.py`` is the plugin's key table; ``launcher.py`` builds nbdkit's command line and runs it."""
