"""The local cluster: the real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, built from the official Go modules), our node agent
that runs pods as local processes in their own network namespaces, and an S3 endpoint.

Never imports the operator or the trainer: it is a Kubernetes, nothing more.
"""
