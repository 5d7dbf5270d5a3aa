"""A kubeconfig that points kubectl, the kubernetes client and kopf at the embedded API server."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml


def kubeconfig(url: str, token: str, path: str | os.PathLike[str], context: str = "kubetune-local",
               ca_data: bytes | None = None) -> Path:
    """Write a kubeconfig for `url` with bearer `token`; pass `APIServer.ca_data` for an https server.

    Without `ca_data` an https server is trusted blindly (insecure-skip-tls-verify): fine for a
    loopback test server, say so if you expose it.
    """
    cluster: dict[str, object] = {"server": url}
    if url.startswith("https://"):
        if ca_data:
            cluster["certificate-authority-data"] = base64.b64encode(ca_data).decode()
        else:
            cluster["insecure-skip-tls-verify"] = True
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": cluster}],
        "users": [{"name": context, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
        "current-context": context,
        "preferences": {},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)  # it holds the bearer token
    return target
