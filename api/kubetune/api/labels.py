"""The labels and names on the pods the operator creates: what `kubectl -l`, the kubectl
plugin, the chart's PodMonitor and NetworkPolicies, and Prometheus' relabelling select on. The
operator sets them; everyone else reads them from here."""

from __future__ import annotations

JOB_NAME_LABEL = "kubetune.dev/job-name"
JOB_UID_LABEL = "kubetune.dev/job-uid"
REPLICA_INDEX_LABEL = "kubetune.dev/replica-index"
"""The worker's index in the gang (its torchrun node rank); the preflight pod has none."""
ATTEMPT_LABEL = "kubetune.dev/attempt"
COMPONENT_LABEL = "app.kubernetes.io/component"
WORKER, PREFLIGHT = "worker", "preflight"
"""The values of COMPONENT_LABEL."""
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
CONTAINER_NAME = "trainer"
"""The one container of a worker or preflight pod."""
