"""A stand-in health probe: ``python -m targetgen.standins.probe KEY``.

Exits 0 (healthy) unless the file ``probe-fail/KEY`` exists in the state dir
(``MERLIN_STATE_DIR``, which the prober passes): then it prints why on stderr
and exits 3, as a real probe whose board stopped answering would. Creating
the file breaks the unit, removing it is the repair.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXIT_UNHEALTHY = 3


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m targetgen.standins.probe KEY", file=sys.stderr)
        return 2
    key = args[0]
    state_dir = Path(os.environ.get("MERLIN_STATE_DIR", "build/generated/ray"))
    marker = state_dir / "probe-fail" / key
    if marker.exists():
        print(f"{key}: no answer on the console ({marker} says the unit is broken)", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{key}: console answers, link up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
