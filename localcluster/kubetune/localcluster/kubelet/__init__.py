"""Local kubelet: runs the embedded cluster's pods as local processes."""

from kubetune.localcluster.kubelet.kubelet import NODE_NAME, Kubelet

__all__ = ["Kubelet", "NODE_NAME"]
