"""``merlin mcp``: a stdio MCP server for coding agents (Claude Code, Codex, ...), see ``broker.mcp``.

Add it to Claude Code with ``claude mcp add merlin -- merlin mcp`` (or the
venv's absolute path to ``merlin``). Leases it takes are renewed while the
session lives and released when it ends (stdin closes, SIGTERM), unless the
agent reserved them with ``keep=true``.
"""

from __future__ import annotations

import argparse

from broker.cli.common import Context, note

__all__ = ["register", "default_mcp_holder"]


def default_mcp_holder() -> str:
    """``mcp:user@host``: an agent's leases are told apart from its user's own at a glance."""
    from broker.client import default_holder

    return f"mcp:{default_holder()}"


def register(top: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    mcp = top.add_parser(
        "mcp",
        parents=[common],
        help="serve the broker to a coding agent over MCP (stdio)",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mcp.add_argument("--holder", default=None, help="who holds the session's leases (default: mcp:user@host)")
    mcp.set_defaults(run=_mcp)


def _mcp(ctx: Context) -> int:
    try:
        from broker.mcp.server import MerlinSession, serve
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith(("mcp", "mcp_types")):
            raise
        note("merlin: merlin mcp needs the MCP SDK: pip install 'merlin-broker[mcp]'")
        return 1
    from broker.mcp.backend import ShimBackend
    from broker.models import Holder, checked

    holder = checked(Holder, ctx.args.holder or default_mcp_holder(), "holder")  # bad: exit 3, before any tool
    backend = ShimBackend(address=ctx.address, namespace=ctx.namespace, state_dir=str(ctx.state.root))
    return serve(MerlinSession(backend, holder))
