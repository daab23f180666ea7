"""``python -m broker.devtools.chaos [--short|--long]``: the same as ``merlin chaos``."""

import sys

from broker.cli import main

sys.exit(main(["chaos", *sys.argv[1:]]))
