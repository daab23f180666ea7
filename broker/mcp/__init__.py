"""``merlin mcp``: the broker as tools for coding agents, over the Model Context Protocol (stdio).

``session`` is the pure part (which leases this MCP session holds, when each is
due for renewal, what it gives back at the end, the JSON an agent reads);
``backend`` the one seam to the broker (the shim: session-bound leases);
``server`` the tools on the official ``mcp`` SDK, the background renewer and
the shutdown. The SDK is an optional extra (``pip install 'merlin-broker[mcp]'``):
nothing here imports it until ``merlin mcp`` runs.
"""

__all__: list[str] = []
