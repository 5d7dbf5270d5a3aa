"""Embedded Kubernetes API server: kubetune's local mode and test bed (kubectl, kopf and the
kubernetes client work against it)."""

from .app import APIServer, LogSource
from .kubeconfig import kubeconfig

__all__ = ["APIServer", "LogSource", "kubeconfig"]
