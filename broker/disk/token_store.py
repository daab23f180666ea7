"""``tokens.json`` and ``operator.token`` in the state dir: the one module that reads and writes them.

``tokens.json`` holds only digests (0600 all the same); ``operator.token``
holds the operator's secret itself, 0600, made once per state dir by whoever
needs it first (``start-local``, or the coordinator) and never replaced, so
a CLI on the broker's own machine authenticates with no set-up.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from broker.core.tokens import TokenBook, TokenRecord, new_secret, token_digest
from broker.disk.store import FILE_MODE, StateDir, atomic_write

__all__ = ["TokenStore", "operator_token_path", "ensure_operator_token", "read_operator_token"]


def operator_token_path(state: StateDir) -> Path:
    return state.root / "operator.token"


def ensure_operator_token(state: StateDir) -> str:
    """The state dir's operator secret, made now (0600, exclusively) if it does not exist."""
    path = operator_token_path(state)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, new_secret().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    secret = read_operator_token(state)
    assert secret is not None
    return secret


def read_operator_token(state: StateDir) -> str | None:
    try:
        return operator_token_path(state).read_text().strip() or None
    except OSError:
        return None


class TokenStore:
    def __init__(self, state: StateDir):
        self._state = state
        self.path = state.root / "tokens.json"

    def load(self) -> TokenBook:
        records: list[TokenRecord] = []
        if self.path.exists():  # no file yet: no tokens but the operator's
            data = json.loads(self.path.read_text())
            records = [TokenRecord.model_validate(item) for item in data]
        secret = ensure_operator_token(self._state)
        return TokenBook(records, token_digest(secret))

    def save(self, book: TokenBook) -> None:
        body = json.dumps([record.model_dump() for record in book.records()], indent=2).encode()
        atomic_write(self.path, body)
