#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kube-scheduler of the versions go.mod
# pins into the folder given as $1. Go's module and build caches (in their usual places, outside
# the repository) make a second build quick; the first takes a while on 2 cores.
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTPUT_DIR}")
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build the control plane (or set KUBETUNE_CONTROL_PLANE_BIN to a folder of prebuilt binaries)" >&2; exit 1; }
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)  # the one pin: v1.MINOR.PATCH
minor=$(echo "$version" | cut -d. -f2)
pkg=k8s.io/component-base/version
# What the official release build stamps in, so `kubectl version` and the API's /version say
# which Kubernetes this is (otherwise v0.0.0-master).
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$version"
mkdir -p "$out"
go build -ldflags "$ldflags" -o "$out/" tool ./cmd/etcd
echo "built etcd $(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3) and Kubernetes $version control plane into $out"
