"""``python -m kmsctl``: the same as the ``kmsctl`` command."""

import sys

from kmsctl.cli import main

sys.exit(main())
