"""``python -m targetgen.standins``: run one stand-in action."""

import sys

from targetgen.standins.run import main

sys.exit(main())
