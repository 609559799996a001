"""``python -m steadygrad.cli``: the ``steadygrad`` command."""

import sys

from . import main

sys.exit(main())
