"""Shared test helpers."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of an external tool; skipped locally when missing, a failure where CI demands it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package 'prometheus'; `make test` installs it as root)"
    if os.environ.get("MERLIN_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
