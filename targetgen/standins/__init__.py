"""Stand-in step programs: fake hardware tools that print, wait, and write real artifacts.

Until a spec names its real tools, every rung of a default ladder runs one of
these. They run on any Linux machine, touch no network and no hardware, and
behave like the tools they replace where the executor can see it: progress on
stdout, errors on stderr, an exit code, and artifact files under
``artifacts/`` of the target dir (``MERLIN_TARGET_DIR`` when the executor sets
it, else the working dir)::

    python -m targetgen.standins <action> [--step ID] [--target NAME] [--resource KEY] [--out PATH]

``--step`` defaults to ``MERLIN_STEP_ID`` (set by the executor), else the action.

Knobs, for demos and tests:

- ``MERLIN_STANDIN_SECONDS``: how long the "work" takes (default 0.2).
- ``FAIL_<step-id>``: a file in the target dir makes that step fail with exit
  code 3; removing it is the fix. ``MERLIN_STANDIN_FAIL=<id>[,<id>...]`` does
  the same from the environment.
- ``MERLIN_FENCING_TOKEN`` (and ``MERLIN_LEASE_ID``, as its public ref) are
  recorded in the artifacts, to show which lease a board operation ran under.

This module is the table of actions (pure data, also read by the planner);
:mod:`targetgen.standins.run` is the program.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StandinAction", "ACTIONS", "EXIT_INJECTED_FAILURE", "EXIT_MISSING_INPUT", "EXIT_USAGE"]

EXIT_USAGE = 2
EXIT_INJECTED_FAILURE = 3
EXIT_MISSING_INPUT = 4


@dataclass(frozen=True)
class StandinAction:
    """One fake tool: what the real one does, what it reads, what it writes, what it prints."""

    name: str
    summary: str
    output: str  # relative to the target dir; --out replaces it
    needs_input: str | None  # an artifact an earlier step leaves; missing -> exit 4, like a real tool
    progress: tuple[str, ...]


ACTIONS: dict[str, StandinAction] = {
    action.name: action
    for action in (
        StandinAction(
            "build-bitstream",
            "synthesize, place and route the design into an FPGA bitstream",
            "artifacts/build/bitstream.bit",
            None,
            ("synthesizing", "placing", "routing", "writing bitstream"),
        ),
        StandinAction(
            "flash-fpga",
            "load the bitstream onto the FPGA",
            "artifacts/flash/flash.json",
            "artifacts/build/bitstream.bit",
            ("opening the FPGA", "programming", "verifying readback"),
        ),
        StandinAction(
            "build-image",
            "build the firmware and the Linux image for the board",
            "artifacts/build/image.img",
            None,
            ("building firmware", "building kernel", "packing image"),
        ),
        StandinAction(
            "flash-board",
            "write the image to the board's boot media",
            "artifacts/flash/flash.json",
            "artifacts/build/image.img",
            ("connecting to the board", "writing image", "verifying"),
        ),
        StandinAction(
            "boot",
            "power the target on and capture its boot console",
            "artifacts/boot/console.log",
            "artifacts/flash/flash.json",
            ("powering on", "waiting for the console", "reached login prompt"),
        ),
        StandinAction(
            "smoke-test",
            "run the smoke tests on the booted target",
            "artifacts/smoke/results.json",
            "artifacts/boot/console.log",
            ("running hello", "running memtest", "running ifconfig"),
        ),
        StandinAction(
            "verilate",
            "compile the RTL into a simulator binary",
            "artifacts/build/simulator.bin",
            None,
            ("parsing RTL", "elaborating", "compiling the model"),
        ),
        StandinAction(
            "simulate",
            "run the test programs in the simulator",
            "artifacts/sim/sim.log",
            "artifacts/build/simulator.bin",
            ("loading programs", "simulating", "collecting traces"),
        ),
        StandinAction(
            "check-results",
            "compare the simulation output with the expected results",
            "artifacts/sim/results.json",
            "artifacts/sim/sim.log",
            ("reading the simulation log", "comparing signatures"),
        ),
    )
}
