"""``python -m broker.cli``: the same as the ``merlin`` command."""

import sys

from broker.cli import main

sys.exit(main())
