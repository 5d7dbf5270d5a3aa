#!/usr/bin/env bash
# Build prometheus and promtool of the version go.mod pins into the folder given as $1, with
# Kubernetes service discovery only (build tags remove_all_sd,enable_kubernetes_sd: Debian's
# package has none, and the other discoveries' cloud SDKs would triple the build). No web UI
# assets: the local cluster uses Prometheus' HTTP API. Go's caches make a second build quick.
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTPUT_DIR}")
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build Prometheus" >&2; exit 1; }
module=$(go list -m -f '{{.Version}}' github.com/prometheus/prometheus)  # v0.3MM.P is Prometheus 3.MM.P
minor=$(echo "$module" | cut -d. -f2)
version="3.$((10#$minor - 300)).$(echo "$module" | cut -d. -f3)"
pkg=github.com/prometheus/common/version
ldflags="-s -w -X $pkg.Version=$version -X $pkg.Revision=$module -X $pkg.Branch=$module -X $pkg.BuildUser=kubetune"
mkdir -p "$out"
go build -tags remove_all_sd,enable_kubernetes_sd -ldflags "$ldflags" -o "$out/" tool
echo "built Prometheus $version (module $module) into $out"
