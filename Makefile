# kubetune — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
# This workplace keeps the CPU wheel of torch in pip's find-links folder; read it from pip's
# config instead of hard-coding it, so a machine without that folder still installs (from PyPI).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS   := $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
PYTEST_ARGS ?=
BENCH_ARGS  ?=

.PHONY: help install demo test test-fast chaos lint crds chart bench bench-local bench-operator clean

help: ## Show the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The local cluster's control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler), built from the Go modules pinned in localcluster/controlplane/go.mod into the
# venv's bin, beside the pinned kubectl. Set KUBETUNE_CONTROL_PLANE_BIN to a folder of prebuilt
# binaries to skip the build.
CONTROL_PLANE := localcluster/controlplane
ifeq ($(KUBETUNE_CONTROL_PLANE_BIN),)
CONTROL_PLANE_STAMP := $(VENV)/.control-plane
else
CONTROL_PLANE_STAMP :=
endif

$(VENV)/.control-plane: $(CONTROL_PLANE)/go.mod $(CONTROL_PLANE)/go.sum $(CONTROL_PLANE)/build.sh $(wildcard $(CONTROL_PLANE)/cmd/*/*.go) | $(VENV)/.installed
	$(CONTROL_PLANE)/build.sh $(BIN)
	touch $@

# Prometheus (prometheus and promtool) with Kubernetes service discovery, of the version pinned
# in localcluster/prometheus/go.mod: the local cluster's monitoring and the alert rules' checker.
PROMETHEUS := localcluster/prometheus
$(VENV)/.prometheus: $(PROMETHEUS)/go.mod $(PROMETHEUS)/go.sum $(PROMETHEUS)/build.sh | $(VENV)/.installed
	$(PROMETHEUS)/build.sh $(BIN)
	touch $@

# kwok, of the version pinned in localcluster/kwok/go.mod: simulated nodes for the operator's
# scale benchmark and the chaos tests.
KWOK := localcluster/kwok
$(VENV)/.kwok: $(KWOK)/go.mod $(KWOK)/go.sum $(KWOK)/build.sh | $(VENV)/.installed
	$(KWOK)/build.sh $(BIN)
	touch $@

install: $(VENV)/.installed $(CONTROL_PLANE_STAMP) $(VENV)/.prometheus $(VENV)/.kwok ## Create .venv with kubetune and everything its tests need; build the control plane, Prometheus and kwok.

# uv resolves this stack in seconds where pip backtracks for minutes; it lives inside the venv so
# nothing outside the repository is touched. DS_BUILD_OPS=0: DeepSpeed compiles its CPU op lazily.
$(VENV)/.installed: pyproject.toml
	@command -v ip >/dev/null && command -v unshare >/dev/null || { \
	  echo "installing iproute2 and util-linux (pod networking of the local cluster)"; \
	  apt-get update -qq && apt-get install -y -qq iproute2 util-linux >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --upgrade >/dev/null  # a venv made by uv has no pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	DS_BUILD_OPS=0 VIRTUAL_ENV=$(VENV) $(BIN)/uv pip install --quiet $(UV_FLAGS) -e '.[dev]'
	touch $@

demo: install ## Start the local cluster, run examples/quickstart.yaml to Succeeded, stop everything.
	$(BIN)/kubetune demo

test: install ## Run the whole test suite (unit, local-cluster component tests, end to end).
	$(BIN)/pytest --durations=15 $(PYTEST_ARGS)

test-fast: install ## Unit tests only (no cluster, no training).
	$(BIN)/pytest -m "not e2e" tests/api tests/contracts tests/cli tests/operator tests/localcluster/test_kubelet_units.py \
	  tests/localcluster/test_container_logs.py tests/localcluster/test_pins.py tests/packaging/test_import_boundaries.py \
	  tests/chart/test_chart.py tests/examples tests/localcluster/test_prometheus_config.py \
	  --ignore=tests/operator/test_operator_on_cluster.py $(PYTEST_ARGS)

chaos: install ## Every chaos row with its full number of trials (~90 min); prints the chaos table, writes .chaos/table.json.
	KUBETUNE_CHAOS=full KUBETUNE_CHAOS_REPORT=.chaos/table.json $(BIN)/pytest tests/chaos tests/e2e/test_worker_chaos.py \
	  tests/e2e/test_quickstart.py::test_quickstart_runs_to_succeeded_and_publishes_a_working_adapter \
	  tests/chart/test_chart_on_cluster.py $(PYTEST_ARGS)

crds: install ## Regenerate crds/finetunejob.yaml (and the chart's copy) from the types in api/kubetune/api/.
	$(BIN)/python -m kubetune.api.crd crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/kubetune/files/crds/finetunejob.yaml

chart: install ## Regenerate the chart's README and values.schema.json descriptions from values.yaml's comments.
	$(BIN)/python charts/chart_docs.py

lint: install ## Static checks (ruff: unused and undefined names).
	$(BIN)/ruff check .

bench: install ## Trainer benchmark vs HF Trainer and a bare loop, text and realistic chat workloads (~2 h; writes BENCHMARKS.md).
	$(BIN)/python benchmarks/trainer_bench.py $(BENCH_ARGS)

bench-local: install ## Local cluster benchmark: `local up` time and idle memory vs etcd + apiserver alone (~3 min).
	$(BIN)/python benchmarks/localcluster_bench.py $(BENCH_ARGS)

bench-operator: install ## Operator at scale: 100, 300 and 1000 jobs on kwok nodes vs the Job controller (~30 min; writes BENCHMARKS.md).
	$(BIN)/python benchmarks/operator_bench.py $(BENCH_ARGS)

clean: ## Stop a local cluster left running and remove build leftovers.
	-$(BIN)/kubetune local down
	rm -rf .kubetune .pytest_cache .bench .chaos
