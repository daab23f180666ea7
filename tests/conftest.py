"""Shared test helpers."""

from __future__ import annotations

import os
import shutil

import pytest


def unavailable(message: str) -> None:
    """A test's external need is missing: skipped locally, a failure where CI demands everything."""
    if os.environ.get("MERLIN_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external tool (see :func:`unavailable`)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package 'prometheus'; `make test` installs it as root)")
    return path  # type: ignore[return-value]
