"""The local node agent (our kubelet): runs the pods bound to its Node as local processes."""

from kubetune.localcluster.kubelet.kubelet import NODE_NAME, Kubelet

__all__ = ["Kubelet", "NODE_NAME"]
