"""``python -m vdisk.cli``: the ``vdisk`` command."""

import sys

from vdisk.cli.main import main

sys.exit(main())
