"""Shared test helpers."""

from __future__ import annotations

import os
import shutil

import pytest


def unavailable(message: str) -> None:
    """A test's external need is missing: a failure, unless a developer opts out with
    ``MERLIN_REQUIRE_TOOLS=0`` (then it is reported as skipped, never silently passed)."""
    if os.environ.get("MERLIN_REQUIRE_TOOLS", "1") != "0":
        pytest.fail(f"{message} (set MERLIN_REQUIRE_TOOLS=0 to skip on this machine)")
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external tool (see :func:`unavailable`)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package 'prometheus'; `make test` installs it as root)")
    return path  # type: ignore[return-value]
