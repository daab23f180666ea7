"""The broker's error tree: what callers catch, and the CLI's exit codes.

::

    BrokerError                 root; never raised itself
    ├── InvalidRequest          a bad argument (names the field and the value); exit 3
    ├── UnknownResource         the key is not in the catalog; exit 4
    ├── ResourceBusy            wait=False on a held key, or the key is in maintenance; exit 5
    ├── LeaseNotFound           no lease has this id; exit 6
    ├── LeaseNotHeld            the lease exists but is not granted (ended, queued, or another
    │                           holder); exit 7
    ├── StaleFencingToken       a job presented a token that no longer holds the key; exit 8
    ├── WaitTimeout             a waiting reserve ran out of time and left the queue; exit 9
    ├── BrokerUnavailable       no cluster, no broker, an actor that does not answer, or a
    │                           state dir that cannot be written; exit 10
    └── NotAuthorized           an administrative act without the catalog's admin secret; exit 11

Every class passes all of its constructor arguments to ``Exception.__init__``
and formats its message in ``__str__``: Ray pickles an error raised in an
actor and re-raises it on the caller, so ``except ResourceBusy:`` works in a
notebook and the fields survive the trip.

Messages are one line and say what to do next in the caller's own words:
the hint is a :class:`Hint`, spelled per :class:`Surface` by the ``HINTS``
table (``wait=True`` in Python, ``--wait`` on the command line), so the
message itself never mixes them. ``str(err)`` is the Python spelling;
:meth:`BrokerError.describe` gives any surface's; :func:`error_json` is the
``{"error": {...}}`` object the CLI prints under ``--json``. Even the class
Ray builds when it re-raises an actor's error (``RayTaskError(ResourceBusy)``,
whose ``str`` is the remote traceback) prints the one line: see
:meth:`BrokerError.__init_subclass__`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, ClassVar

from broker.core.compat import StrEnum

__all__ = [
    "BrokerError",
    "InvalidRequest",
    "UnknownResource",
    "ResourceBusy",
    "LeaseNotFound",
    "LeaseNotHeld",
    "StaleFencingToken",
    "WaitTimeout",
    "BrokerUnavailable",
    "NotAuthorized",
    "NotAuthenticated",
    "ERROR_TYPES",
    "error_from_json",
    "EXIT_CODES",
    "SIGNAL_EXIT_CODES",
    "RunEnd",
    "RUN_EXIT_CODES",
    "Surface",
    "Hint",
    "HINTS",
    "error_json",
]


class Surface(StrEnum):
    """Where an error is shown: each spells its hint in its own terms."""

    PYTHON = "python"
    CLI = "cli"
    HTTP = "http"


class Hint(StrEnum):
    """What the caller can do next; spelled per surface in ``HINTS``."""

    QUEUE = "queue"
    QUEUE_MAINTENANCE = "queue_maintenance"
    LONGER_TIMEOUT = "longer_timeout"
    ADMIN_SECRET = "admin_secret"
    API_TOKEN = "api_token"


HINTS: dict[Hint, dict[Surface, str]] = {
    Hint.QUEUE: {
        Surface.PYTHON: "pass wait=True to queue",
        Surface.CLI: "use --wait to queue",
        Surface.HTTP: 'send "wait": true to queue',
    },
    Hint.QUEUE_MAINTENANCE: {
        Surface.PYTHON: "wait=True queues until it is back",
        Surface.CLI: "--wait queues until it is back",
        Surface.HTTP: '"wait": true queues until it is back',
    },
    Hint.LONGER_TIMEOUT: {
        Surface.PYTHON: "the request left the queue; retry with a longer timeout_s",
        Surface.CLI: "the request left the queue; retry with a longer --timeout",
        Surface.HTTP: 'the request left the queue; retry with a longer "timeout_s"',
    },
    Hint.ADMIN_SECRET: {
        Surface.PYTHON: "pass admin_secret= or set MERLIN_ADMIN_SECRET; refused and journaled",
        Surface.CLI: "set MERLIN_ADMIN_SECRET or pass --admin-secret-file; refused and journaled",
        Surface.HTTP: "send the admin secret; refused and journaled",
    },
    Hint.API_TOKEN: {
        Surface.PYTHON: "pass a token (MERLIN_TOKEN); refused and journaled",
        Surface.CLI: "set MERLIN_TOKEN, or run on the broker's machine (its operator token); refused and journaled",
        Surface.HTTP: "send Authorization: Bearer <token> (`merlin broker token create NAME`); refused and journaled",
    },
}


class BrokerError(Exception):
    """Root of every error the broker raises on purpose.

    Subclasses implement :meth:`summary` (the one-line fact, no hint) and may
    name a :class:`Hint`; ``__str__`` joins them in Python's spelling.
    """

    exit_code = 1
    hint_kind: ClassVar[Hint | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Ray re-raises an actor's error as ``class RayTaskError(<ours>)`` whose
        # ``__str__`` is the whole remote traceback (14 lines for a busy key in a
        # notebook). That class is a subclass of ours, so it passes through here:
        # give it our one line back; ``err.remote_traceback()`` still has the rest.
        super().__init_subclass__(**kwargs)
        if any(base.__name__ == "RayTaskError" for base in cls.__mro__[1:]) and "__str__" in vars(cls):
            cls.remote_traceback = vars(cls)["__str__"]  # type: ignore[attr-defined]

            def one_line(self: Any) -> str:
                cause = self.cause
                return str(cause) if isinstance(cause, BrokerError) else Exception.__str__(self)

            cls.__str__ = one_line  # type: ignore[method-assign]

    def summary(self) -> str:
        """The fact, in one line, without a hint."""
        return str(self.args[0]) if self.args else type(self).__name__

    def hint_for(self, surface: Surface) -> str:
        hint = self._hint()
        return HINTS[hint][surface] if hint is not None else ""

    def _hint(self) -> Hint | None:
        return type(self).hint_kind

    def describe(self, surface: Surface = Surface.PYTHON) -> str:
        """The one-line message with the hint spelled for ``surface``."""
        hint = self.hint_for(surface)
        return f"{self.summary()} ({hint})" if hint else self.summary()

    def fields(self) -> dict[str, Any]:
        """The constructor's arguments by name (what the error is about), for JSON."""
        import inspect  # here, not at the top: it costs a CLI command that succeeds ~20 ms it never needs

        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        return {name: _plain(getattr(self, name, None)) for name in names}

    def __str__(self) -> str:
        return self.describe(Surface.PYTHON)


class InvalidRequest(BrokerError):
    """An argument is wrong; nothing was changed.

    Args:
        message: what is wrong, naming the field and the bad value.
        field: the argument or config field at fault, when one is.
    """

    exit_code = 3

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field)
        self.message = message
        self.field = field

    def summary(self) -> str:
        return self.message


class UnknownResource(BrokerError):
    """The resource key is not in the broker's catalog."""

    exit_code = 4

    def __init__(self, resource: str, known: tuple[str, ...] = ()):
        super().__init__(resource, tuple(known))
        self.resource = resource
        self.known = tuple(known)

    def summary(self) -> str:
        known = f" (known: {', '.join(self.known)})" if self.known else ""
        return f"unknown resource {self.resource!r}{known}"


class ResourceBusy(BrokerError):
    """``reserve(wait=False)`` found the key held, queued for, in maintenance, or down (its host absent)."""

    exit_code = 5

    def __init__(
        self,
        resource: str,
        holder: str | None = None,
        expires_at: float | None = None,
        queue_length: int = 0,
        maintenance_reason: str | None = None,
        down_reason: str | None = None,
    ):
        super().__init__(resource, holder, expires_at, queue_length, maintenance_reason, down_reason)
        self.resource = resource
        self.holder = holder
        self.expires_at = expires_at
        self.queue_length = queue_length
        self.maintenance_reason = maintenance_reason
        self.down_reason = down_reason

    def _hint(self) -> Hint:
        stopped = self.maintenance_reason is not None or self.down_reason is not None
        return Hint.QUEUE_MAINTENANCE if stopped else Hint.QUEUE

    def summary(self) -> str:
        waiting = f"{self.queue_length} waiting" if self.queue_length else "nobody waiting"
        if self.down_reason is not None:
            return f"resource {self.resource!r} is down: {self.down_reason}, {waiting}"
        if self.maintenance_reason is not None:
            why = f": {self.maintenance_reason}" if self.maintenance_reason else ""
            return f"resource {self.resource!r} is in maintenance{why}, {waiting}"
        held = f" by {self.holder}" if self.holder is not None else ""
        if self.expires_at is not None:
            from datetime import datetime, timezone

            until = datetime.fromtimestamp(self.expires_at, tz=timezone.utc)
            held += f" until {until:%Y-%m-%dT%H:%M:%SZ}"
        return f"resource {self.resource!r} is held{held}, {waiting}"


_LEASE_ID_SHAPE = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,63})\.[0-9a-f]{32}$")


def _named(lease_id: object) -> str:
    """How a message names a lease: its key and public ref, never the id (messages reach logs and records)."""
    if not isinstance(lease_id, str):
        return f"<{type(lease_id).__name__}>"
    ref = hashlib.sha256(lease_id.encode()).hexdigest()[:12]  # = broker.models.lease_ref
    match = _LEASE_ID_SHAPE.match(lease_id)
    return f"{match.group(1)} lease ref {ref}" if match else f"lease ref {ref}"


class LeaseNotFound(BrokerError):
    """No lease with this id exists (never did, or not on this broker).

    ``detail`` replaces the message when the lookup was not by lease id
    (e.g. a request id nobody queued).
    """

    exit_code = 6

    def __init__(self, lease_id: str, detail: str = ""):
        super().__init__(lease_id, detail)
        self.lease_id = lease_id
        self.detail = detail

    def summary(self) -> str:
        return self.detail or f"no such lease ({_named(self.lease_id)})"


class LeaseNotHeld(BrokerError):
    """The lease exists but does not hold its key now, or the caller is not its holder.

    Args:
        lease_id: the lease asked about.
        state: the state it is in (``expired``, ``revoked``, ``queued``, ...).
        detail: why the action was refused, e.g. who holds the key instead.
        holder: who holds the lease, when the refusal is that it is someone
            else's (a revoke whose expected holder does not match).
    """

    exit_code = 7

    def __init__(self, lease_id: str, state: str, detail: str = "", holder: str | None = None):
        super().__init__(lease_id, state, detail, holder)
        self.lease_id = lease_id
        self.state = state
        self.detail = detail
        self.holder = holder

    def summary(self) -> str:
        if self.holder is not None:  # it is held, by someone else: say by whom
            return self.detail or f"lease {self.lease_id!r} is held by {self.holder!r}"
        tail = f": {self.detail}" if self.detail else ""
        return f"the lease ({_named(self.lease_id)}) is not held (state {self.state}){tail}"


class StaleFencingToken(BrokerError):
    """A fencing token that no longer matches the key's current grant."""

    exit_code = 8

    def __init__(self, resource: str, token: int, current_token: int | None):
        super().__init__(resource, token, current_token)
        self.resource = resource
        self.token = token
        self.current_token = current_token

    def summary(self) -> str:
        now = "nobody holds it" if self.current_token is None else f"current token is {self.current_token}"
        return f"stale fencing token {self.token} for {self.resource!r}: {now}"


class WaitTimeout(BrokerError):
    """A waiting reserve was not granted in time; its request left the queue."""

    exit_code = 9
    hint_kind = Hint.LONGER_TIMEOUT

    def __init__(self, resource: str, timeout_s: float, lease_id: str | None = None):
        super().__init__(resource, timeout_s, lease_id)
        self.resource = resource
        self.timeout_s = timeout_s
        self.lease_id = lease_id

    def summary(self) -> str:
        from broker.core.duration_text import format_duration

        return f"timed out after {format_duration(self.timeout_s)} waiting for {self.resource!r}"


class BrokerUnavailable(BrokerError):
    """The broker cannot serve the call now; ``hint`` names what to run."""

    exit_code = 10

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint)
        self.message = message
        self.hint = hint

    def summary(self) -> str:
        return self.message

    def hint_for(self, surface: Surface) -> str:
        return self.hint  # names a command to run: the same on every surface

    def describe(self, surface: Surface = Surface.PYTHON) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class NotAuthorized(BrokerError):
    """``revoke``, ``set_maintenance`` or ``broker down`` without the admin secret the catalog requires."""

    exit_code = 11
    hint_kind = Hint.ADMIN_SECRET

    def __init__(self, act: str, by: str = ""):
        super().__init__(act, by)
        self.act = act
        self.by = by

    def summary(self) -> str:
        return f"{self.act} needs the admin secret"

    def hint_for(self, surface: Surface) -> str:
        # On HTTP the caller is its token: a refusal there is about the token, never a secret.
        hint = Hint.API_TOKEN if surface is Surface.HTTP else self._hint()
        return HINTS[hint][surface] if hint is not None else ""


class NotAuthenticated(NotAuthorized):
    """An HTTP API call with no token, or one the broker does not know (or revoked).

    ``why``: the client found no usable token of its own (none given, a token file others can
    read): refused before any request, so nothing is journaled; it says what to do itself.
    """

    hint_kind = Hint.API_TOKEN

    def __init__(self, act: str, by: str = "", why: str = ""):
        super().__init__(act, by)
        self.args = (act, by, why)
        self.why = why

    def summary(self) -> str:
        return self.why or f"{self.act} needs a valid API token"

    def hint_for(self, surface: Surface) -> str:
        return "" if self.why else HINTS[Hint.API_TOKEN][surface]


# The errors the broker raises on purpose, each with its own exit code (NotAuthenticated shares
# NotAuthorized's: a refused identity is exit 11 either way).
_ERRORS: tuple[type[BrokerError], ...] = (
    InvalidRequest,
    UnknownResource,
    ResourceBusy,
    LeaseNotFound,
    LeaseNotHeld,
    StaleFencingToken,
    WaitTimeout,
    BrokerUnavailable,
    NotAuthorized,
)
EXIT_CODES: dict[str, int] = {cls.__name__: cls.exit_code for cls in _ERRORS}
# Every error class by name: what a client of the HTTP API rebuilds from ``{"error": {"type": ...}}``.
ERROR_TYPES: dict[str, type[BrokerError]] = {cls.__name__: cls for cls in (*_ERRORS, NotAuthenticated)}


def error_from_json(body: Any) -> BrokerError:
    """The error an ``{"error": {...}}`` answer names, rebuilt from its fields (the same class, the same
    attributes); an answer that is not one is ``BrokerUnavailable`` naming what came back."""
    error = body.get("error") if isinstance(body, dict) else None
    cls = ERROR_TYPES.get(str(error.get("type"))) if isinstance(error, dict) else None
    if cls is None or not isinstance(error, dict):
        shown = str(error.get("message") if isinstance(error, dict) else body)[:200]
        return BrokerUnavailable(f"the broker's HTTP API answered with an unknown error: {shown}", "")
    nested = error.get("fields")
    fields: dict[str, Any] = nested if isinstance(nested, dict) else error
    import inspect

    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    try:
        return cls(**{name: fields[name] for name in names if name in fields})
    except TypeError:
        return BrokerUnavailable(f"the broker's HTTP API answered: {str(error.get('message'))[:200]}", "")


# A command stopped by a signal exits 128 + the signal's number (the shell's convention): a CI
# runner's cancel (SIGTERM), Ctrl-C (SIGINT), a closed terminal (SIGHUP). A waiting request leaves
# the queue first; a lease the command already holds stays held.
SIGNAL_EXIT_CODES: dict[str, int] = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}


class RunEnd(StrEnum):
    """How a run of a bundle ended, in either engine; :data:`RUN_EXIT_CODES` gives its exit code."""

    SUCCEEDED = "succeeded"  # every step succeeded (or was skipped by an operator)
    STALE_TOKEN = "stale_token"  # a hardware step's fencing check refused: the lease had moved on
    NOT_SUBMITTED = "not_submitted"  # no broker or cluster answered: recorded as blocked
    AWAITING_GATE = "awaiting_gate"  # stopped at an operator gate that nobody approved yet
    STEP_FAILED = "step_failed"  # a step exited non-zero, timed out, or left no artifact
    CANCELLED = "cancelled"  # a person cancelled it (`jobs cancel`, Ctrl-C, SIGTERM)
    LEASE_LOST = "lease_lost"  # its lease was revoked or released by someone else: stopped at once
    BROKER_ERROR = "broker_error"  # the broker could not lease or launch it (the message says why)


# One table for both engines: `merlin targetgen execute` (local) exits with these, and so does
# `--engine ray --wait` and `merlin ray jobs submit --wait`, from the run's record.
RUN_EXIT_CODES: dict[RunEnd, int] = {
    RunEnd.SUCCEEDED: 0,
    RunEnd.STALE_TOKEN: StaleFencingToken.exit_code,
    RunEnd.NOT_SUBMITTED: BrokerUnavailable.exit_code,
    RunEnd.AWAITING_GATE: 20,
    RunEnd.STEP_FAILED: 21,
    RunEnd.CANCELLED: 22,
    RunEnd.LEASE_LOST: 23,
    RunEnd.BROKER_ERROR: 24,
}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def error_json(err: BaseException, surface: Surface = Surface.CLI, exit_code: int | None = None) -> dict[str, Any]:
    """``{"error": {"type", "message", "exit_code", <fields>}}``: an error as a script reads it.

    A ``BrokerError`` brings its constructor's fields (``resource``, ``holder``,
    ``queue_length``, ...); anything else is an internal error (exit 1).
    """
    cause = getattr(err, "cause", None)  # Ray's RayTaskError(<ours>): report ours
    if isinstance(cause, BrokerError):
        err = cause
    if isinstance(err, BrokerError):
        body: dict[str, Any] = {
            "type": type(err).__name__,
            "message": err.describe(surface),
            "exit_code": err.exit_code if exit_code is None else exit_code,
        }
        fields = err.fields()
        for name, value in fields.items():
            body.setdefault(name, value)
        body["fields"] = fields  # exactly the constructor's arguments: a client rebuilds the error from them
        return {"error": body}
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return {
        "error": {
            "type": type(err).__name__,
            "message": text,
            "exit_code": 1 if exit_code is None else exit_code,
        }
    }
