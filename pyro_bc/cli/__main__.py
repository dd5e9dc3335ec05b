"""``python -m pyro_bc.cli``: the ``pyro-bc`` command."""

import sys

from . import main

sys.exit(main())
