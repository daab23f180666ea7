"""``merlin ray resources keep-alive LEASE_ID``: renew until stopped, like ``etcdctl lease keep-alive``.

For shell scripts that hold a lease across steps::

    merlin ray resources keep-alive "$LEASE" --every 30s &   # renews in the background
    ...steps...
    kill $!                                                 # exit 143; the lease stays held

SIGINT, SIGTERM and SIGHUP stop it with one line and exit 130 / 143 / 129
(128 + the signal); the lease is released only with ``--release-on-exit``. A renewal
that is refused (the lease expired or was revoked) ends it with that error
(exit 7); a broker that does not answer is retried until the lease would
have expired.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from broker.cli.common import Context, duration_arg, when
from broker.core.durations import format_duration
from broker.errors import BrokerUnavailable, InvalidRequest, LeaseNotHeld

__all__ = ["register_keep_alive", "signal_exit_code"]


def register_keep_alive(
    resources: argparse._SubParsersAction, common: argparse.ArgumentParser, lease_help: str
) -> None:
    keep = resources.add_parser(
        "keep-alive",
        parents=[common],
        help="renew a lease until Ctrl-C or SIGTERM (exit 130/143); for scripts that hold it across steps",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keep.add_argument("lease_id", help=lease_help)
    keep.add_argument(
        "--every",
        type=duration_arg("every"),
        default=30.0,
        help="renew this often (default 30s; keep it well under the TTL)",
    )
    keep.add_argument(
        "--ttl", type=duration_arg("ttl"), default=None, help="each renewal's time from now (default: the lease's TTL)"
    )
    keep.add_argument("--release-on-exit", action="store_true", help="release the lease when stopped by a signal")
    keep.set_defaults(run=_keep_alive)


def signal_exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def _keep_alive(ctx: Context) -> int:
    args = ctx.args
    if args.every <= 0:
        raise InvalidRequest(f"invalid every={format_duration(args.every)}: must be more than 0s", "every")
    client = ctx.client()
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        caught.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        lease = client.renew(args.lease_id, args.ttl)  # at once: a lease not held fails before any wait
        print(
            f"keeping {lease.resource} (ref {lease.ref}) alive every {format_duration(args.every)}; "
            f"expires {when(lease.expires_at)}",
            flush=True,
        )
        while not stop.wait(args.every):
            try:
                lease = client.call("renew", args.lease_id, args.ttl, answer_within_s=max(args.every, 5.0))
            except BrokerUnavailable:
                if time.time() >= (lease.expires_at or 0.0):
                    raise LeaseNotHeld(
                        args.lease_id, "expired", "no renewal reached the broker before it expired"
                    ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    signum = caught[0]
    if args.release_on_exit:
        lease = client.release(args.lease_id)
        tail = f"{lease.resource} released"
    else:
        tail = f"{lease.resource} stays held until {when(lease.expires_at)}"
    print(f"merlin: keep-alive stopped by {signal.Signals(signum).name}; {tail}", file=sys.stderr)
    return signal_exit_code(signum)
