"""Embedded local Kubernetes: API server, kubelet, pod network and S3 in one process.

Never imports the operator or the trainer: it is a Kubernetes, nothing more.
"""
