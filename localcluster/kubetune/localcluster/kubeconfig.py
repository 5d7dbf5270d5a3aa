"""Kubeconfig files for the local cluster's users: the admin (kubectl, Helm, the operator), the
controller manager and the scheduler. Certificates are embedded, so a file works on its own."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from kubetune.localcluster.pki import KeyPair

CONTEXT = "kubetune-local"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write(path: Path, *, server: str, ca: Path, user: KeyPair, user_name: str, namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{
            "name": user_name,
            "user": {"client-certificate-data": _b64(user.cert), "client-key-data": _b64(user.key)},
        }],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user_name, "namespace": namespace}}],
        "current-context": CONTEXT,
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)  # it holds a private key
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
