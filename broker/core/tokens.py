"""API tokens: who a caller of the HTTP API is. Pure: no files, no clock (``now`` is passed in).

A token is 256 random bits shown once, when it is made; the broker keeps only
its sha256. A token made for NAME *is* NAME on HTTP: it holds and releases
leases as NAME and nobody else, and it may do administrative acts only if it
was made ``admin``. The state dir's operator token (``operator.token``, 0600,
made once per state dir) is the local operator's: trusted like the Ray path,
it may act for any holder and do admin acts.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from broker.errors import InvalidRequest

__all__ = [
    "trusted_admin",
    "Identity",
    "TokenRecord",
    "TokenBook",
    "OPERATOR",
    "token_digest",
    "new_secret",
    "TOKEN_NAME_PATTERN",
]

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,127}$"
_NAME = re.compile(TOKEN_NAME_PATTERN)
_SECRET = re.compile(r"^mt_[0-9a-f]{64}$")
OPERATOR = "operator"  # the name the operator token acts under when it names no holder
# Set by the HTTP API, in the coordinator's own process, for the one request of an admin token:
# the coordinator's admin check passes it (a Ray caller cannot set another process's context).
trusted_admin: ContextVar[str | None] = ContextVar("merlin_trusted_admin", default=None)


def new_secret() -> str:
    return f"mt_{secrets.token_hex(32)}"


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a request is from."""

    name: str
    admin: bool = False
    operator: bool = False  # may act for any holder

    def may_act_as(self, holder: str) -> bool:
        return self.operator or holder == self.name


class TokenRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=TOKEN_NAME_PATTERN)
    admin: bool = False
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float
    created_by: str = ""
    revoked_at: float | None = None
    revoked_by: str = ""

    def public(self) -> dict[str, object]:
        return self.model_dump(exclude={"sha256"})


class TokenBook:
    """The tokens of one broker and the operator token's digest."""

    def __init__(self, records: list[TokenRecord], operator_digest: str | None):
        self._records = {record.name: record for record in records}
        self._operator = operator_digest

    def records(self) -> list[TokenRecord]:
        return sorted(self._records.values(), key=lambda record: record.name)

    def identify(self, secret: object) -> Identity | None:
        """The identity of a bearer secret, or None (unknown, malformed or revoked)."""
        if not isinstance(secret, str) or not _SECRET.match(secret):
            return None
        digest = token_digest(secret)
        if self._operator is not None and hmac.compare_digest(digest, self._operator):
            return Identity(OPERATOR, admin=True, operator=True)
        for record in self._records.values():
            if record.revoked_at is None and hmac.compare_digest(digest, record.sha256):
                return Identity(record.name, admin=record.admin)
        return None

    def create(self, name: object, admin: bool, now: float, by: str) -> tuple[str, TokenRecord]:
        """A new token for ``name`` (its secret, shown once, and the record to keep)."""
        if not isinstance(name, str) or not _NAME.match(name) or name == OPERATOR:
            raise InvalidRequest(
                f"invalid token name {str(name)[:80]!r}: expected {TOKEN_NAME_PATTERN}, not {OPERATOR!r}", "name"
            )
        current = self._records.get(name)
        if current is not None and current.revoked_at is None:
            raise InvalidRequest(f"a token named {name!r} exists; revoke it first", "name")
        secret = new_secret()
        record = TokenRecord(name=name, admin=admin is True, sha256=token_digest(secret), created_at=now, created_by=by)
        self._records[name] = record
        return secret, record

    def revoke(self, name: object, now: float, by: str) -> TokenRecord:
        record = self._records.get(name) if isinstance(name, str) else None
        if record is None:
            raise InvalidRequest(f"no token named {str(name)[:80]!r}", "name")
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": now, "revoked_by": by})
            self._records[record.name] = record
        return record
