"""The default verification ladder of each target class: ordered rungs, each a stand-in action.

A rung is one stage of bringing a target up (build, load, boot, test). Each
default rung runs one stand-in program until a spec replaces its steps with
the real tool. Timeouts are sized for the real tools, not the stand-ins: a
spec that replaces a rung's steps inherits them.
"""

from __future__ import annotations

from dataclasses import dataclass

from targetgen.normalize import TargetClass

__all__ = ["DefaultRung", "DEFAULT_LADDERS", "NEW_RUNG_TIMEOUT_S"]

NEW_RUNG_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DefaultRung:
    """A rung of a default ladder. ``gate`` is a prompt template; ``{resource}`` is the key."""

    name: str
    purpose: str
    action: str  # the stand-in action (targetgen.standins.ACTIONS)
    hardware: bool  # holds the target's resource while it runs
    timeout_s: float
    gate: str | None = None


DEFAULT_LADDERS: dict[TargetClass, tuple[DefaultRung, ...]] = {
    TargetClass.FPGA_EMULATION: (
        DefaultRung("build-bitstream", "turn the design into a bitstream", "build-bitstream", False, 4 * 3600.0),
        DefaultRung(
            "flash-fpga",
            "load the bitstream onto the FPGA",
            "flash-fpga",
            True,
            900.0,
            gate="confirm the bitstream may be loaded on {resource}",
        ),
        DefaultRung("boot", "boot the emulated SoC to a login prompt", "boot", True, 1800.0),
        DefaultRung("smoke-test", "run the smoke tests on the emulated SoC", "smoke-test", True, 1800.0),
    ),
    TargetClass.SILICON_BOARD: (
        DefaultRung("build-image", "build firmware and OS image for the board", "build-image", False, 3600.0),
        DefaultRung(
            "flash-board",
            "write the image to the board",
            "flash-board",
            True,
            900.0,
            gate="confirm the image may be flashed onto {resource}",
        ),
        DefaultRung("boot", "boot the board to a login prompt", "boot", True, 900.0),
        DefaultRung("smoke-test", "run the smoke tests on the board", "smoke-test", True, 1800.0),
    ),
    TargetClass.RTL_SIMULATION: (
        DefaultRung("verilate", "compile the RTL into a simulator", "verilate", False, 3600.0),
        DefaultRung("simulate", "run the test programs on a simulator lane", "simulate", True, 4 * 3600.0),
        DefaultRung(
            "check-results", "compare the simulation output with the expected results", "check-results", False, 600.0
        ),
    ),
}
