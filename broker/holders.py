"""Who a caller is when it does not say: ``user@host``, and the admin secret from the environment.

A module of its own so the CLI names a holder without importing the shim (and what it imports).
"""

from __future__ import annotations

import getpass
import socket

from broker.errors import BrokerUnavailable

__all__ = ["default_holder", "admin_secret_from_env"]


def default_holder() -> str:
    """``user@host``: who holds a lease when nobody says otherwise."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def admin_secret_from_env() -> str | None:
    """The admin secret from ``MERLIN_ADMIN_SECRET`` or the file ``MERLIN_ADMIN_SECRET_FILE`` names."""
    import os

    if os.environ.get("MERLIN_ADMIN_SECRET"):
        return os.environ["MERLIN_ADMIN_SECRET"]
    path = os.environ.get("MERLIN_ADMIN_SECRET_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise BrokerUnavailable(f"cannot read the admin secret file {path}: {exc.strerror}") from None
    return None
