"""Ray Serve, for the HTTP API's second server (:mod:`broker.http.serve`): every Serve call is here.

One deployment, one replica, no CPU reserved (it waits on the coordinator, it does not
compute — like the broker's actors). Serve's controller and proxy are detached actors
of their own (namespace ``serve``): they outlive the driver that deployed the app.
"""

from __future__ import annotations

from typing import Any

from ray import serve

__all__ = ["application", "deploy_application", "delete_application"]


def application(cls: type, *args: Any) -> Any:
    """``cls`` as a one-replica Serve application bound to ``args`` (what ``serve run`` imports)."""
    deployment = serve.deployment(name=cls.__name__, num_replicas=1, ray_actor_options={"num_cpus": 0})(cls)
    return deployment.bind(*args)


def deploy_application(cls: type, *args: Any, name: str, host: str, port: int) -> None:
    """Start Serve's proxy on ``host:port`` (head node only) unless Serve runs already, then deploy.

    A Serve that already runs keeps the address it was started with (Serve warns); the caller
    says which address it asked for. Needs a connected Ray driver.
    """
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(application(cls, *args), name=name, route_prefix="/", blocking=False)


def delete_application(name: str) -> bool:
    """Take the application ``name`` down (Serve's controller and proxy stay); False if none ran."""
    if name not in serve.status().applications:
        return False
    serve.delete(name)
    return True
