#!/usr/bin/env bash
# Build kwok (Kubernetes WithOut Kubelet) of the version go.mod pins into the folder given as $1:
# it plays thousands of nodes and moves their pods through their phases on a timeline, without
# running anything. The operator's scale benchmark and the chaos tests use it. Go's caches make a
# second build quick.
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTPUT_DIR}")
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build kwok" >&2; exit 1; }
version=$(go list -m -f '{{.Version}}' sigs.k8s.io/kwok)
mkdir -p "$out"
go build -ldflags "-s -w" -o "$out/" tool
echo "built kwok $version into $out"
