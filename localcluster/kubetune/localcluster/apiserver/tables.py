"""meta.k8s.io/v1 Table rendering for ``kubectl get``, as kube-apiserver renders it server side.

Column definitions and cells follow kubernetes pkg/printers/internalversion/printers.go for
built-in kinds (the server always sends the wide, priority-1 columns; kubectl hides them
without ``-o wide``) and apiextensions' tableconvertor for custom resources (Name, then the
CRD's additionalPrinterColumns; a CRD without printer columns gets a default Age column).
Ages are preformatted strings, exactly like apimachinery's duration.HumanDuration.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from kubetune.localcluster.apiserver.schema import go_value

_NAME_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name automatically. "
    "Name is primarily intended for creation idempotence and configuration definition. Cannot be "
    "updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")
_CREATION_DESCRIPTION = (
    "CreationTimestamp is a timestamp representing the server time when this object was created. "
    "It is not guaranteed to be set in happens-before order across separate operations. Clients may "
    "not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. "
    "Read-only. Null for lists. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata")

_COLUMN_KEYS = ("name", "type", "format", "description", "priority")


def _column(name: str, type_: str = "string", *, format_: str = "", description: str = "",
            priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": type_, "format": format_, "description": description, "priority": priority}


def _name_column(priority: int = 0) -> dict[str, Any]:
    return _column("Name", format_="name", description=_NAME_DESCRIPTION, priority=priority)


def _age_column() -> dict[str, Any]:
    return _column("Age", description=_CREATION_DESCRIPTION)


# ---------------------------------------------------------------------------------------------
# Time


def parse_time(timestamp: str | None) -> datetime | None:
    """An RFC 3339 timestamp as Kubernetes writes it ("Z" or an offset, optional fraction)."""
    if not timestamp:
        return None
    try:
        parsed = datetime.fromisoformat(str(timestamp).replace("z", "Z"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def human_duration(seconds_total: float) -> str:
    """apimachinery util/duration.HumanDuration for a duration in seconds."""
    seconds = int(seconds_total)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 60 * 2:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = seconds // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rest == 0 else f"{hours // 24 // 365}y{rest}d"
    return f"{hours // 24 // 365}y"


def format_age(timestamp: str | None, now: datetime) -> str:
    """kubectl's age of ``timestamp`` at ``now``; "<unknown>" when unset, "<invalid>" when unparsable."""
    if not timestamp:
        return "<unknown>"
    then = parse_time(timestamp)
    if then is None:
        return "<invalid>"
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return human_duration((now - then).total_seconds())


def _rfc3339(timestamp: str | None) -> str:
    then = parse_time(timestamp)
    if then is None:
        return ""
    return then.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Custom resources


def crd_columns(crd_version: dict[str, Any]) -> list[dict[str, Any]]:
    """Column definitions for a CRD version: Name, then its additionalPrinterColumns.

    With no printer columns Kubernetes serves a default ``Age`` column (type date); with
    printer columns it adds nothing, so a CRD that wants AGE lists it. Printer columns keep
    their ``jsonPath`` here for row_cells; to_table leaves it out of columnDefinitions.
    """
    printer = crd_version.get("additionalPrinterColumns") or [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
         "description": _CREATION_DESCRIPTION}]
    columns = [_name_column()]
    for entry in printer:
        description = entry.get("description") or (
            f"Custom resource definition column (in JSONPath format): {entry.get('jsonPath', '')}")
        column = _column(entry["name"], entry.get("type", "string"), format_=entry.get("format", ""),
                         description=description, priority=int(entry.get("priority", 0)))
        column["jsonPath"] = entry.get("jsonPath", "")
        columns.append(column)
    return columns


_TOKEN = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_\-$]+)"""
    r"""|\[(?P<index>-?\d+)\]"""
    r"""|\[\?\(@\.(?P<filter_field>[A-Za-z0-9_.\-]+)\s*==\s*(?P<quote>["'])(?P<filter_value>.*?)(?P=quote)\)\]"""
    r"""|\[(?P<kq>["'])(?P<key>.*?)(?P=kq)\]""")


def jsonpath_find(obj: Any, expression: str) -> list[Any]:
    """Values at a printer-column JSONPath: dotted fields, ``[N]``, ``['key']`` and
    ``[?(@.field=="value")]`` filters (each match continues). Missing keys yield no value."""
    text = expression.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("$"):
        text = text[1:]
    current = [obj]
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {expression!r} at {text[position:]!r}")
        position = match.end()
        following: list[Any] = []
        for value in current:
            if match.group("field") is not None or match.group("key") is not None:
                key = match.group("field") if match.group("field") is not None else match.group("key")
                if isinstance(value, dict) and key in value:
                    following.append(value[key])
            elif match.group("index") is not None:
                index = int(match.group("index"))
                if isinstance(value, list) and -len(value) <= index < len(value):
                    following.append(value[index])
            else:
                wanted = match.group("filter_value")
                for item in value if isinstance(value, list) else []:
                    found = jsonpath_find(item, "." + match.group("filter_field"))
                    if found and _jsonpath_text(found[0]) == wanted:
                        following.append(item)
        current = following
    return current


def _jsonpath_text(value: Any) -> str:
    """How client-go's jsonpath prints a value (strings raw, everything else as Go/JSON does)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "<nil>"
    return go_value(value)


def _custom_cell(column: dict[str, Any], obj: dict[str, Any], now: datetime) -> Any:
    try:
        found = jsonpath_find(obj, column.get("jsonPath", ""))
    except ValueError:
        return None
    if not found or found[0] is None:
        return None
    value = found[0]
    kind = column.get("type", "string")
    if kind == "string":
        return _jsonpath_text(value)
    if kind == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "date" and isinstance(value, str):
        return format_age(value, now) if parse_time(value) else "<invalid>"
    return None


# ---------------------------------------------------------------------------------------------
# Built-in kinds


def builtin_columns(resource: str) -> list[dict[str, Any]]:
    """Column definitions kube-apiserver serves for a built-in resource (plural name)."""
    columns = _BUILTIN_COLUMNS.get(resource)
    if columns is None:
        return [_name_column(), _age_column()]
    return [dict(column) for column in columns]


_BUILTIN_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "pods": [
        _name_column(),
        _column("Ready", description="The aggregate readiness state of this pod for accepting traffic."),
        _column("Status", description="The aggregate status of the containers in this pod."),
        _column("Restarts", description="The number of times the containers in this pod have been restarted "
                                        "and when the last container in this pod has restarted."),
        _age_column(),
        _column("IP", description="podIP address allocated to the pod.", priority=1),
        _column("Node", description="NodeName indicates in which node this pod is scheduled.", priority=1),
        _column("Nominated Node", description="nominatedNodeName is set when this pod preempts other pods on the node.", priority=1),
        _column("Readiness Gates", description="If specified, all readiness gates will be evaluated for pod readiness.", priority=1),
    ],
    "services": [
        _name_column(),
        _column("Type", description="type determines how the Service is exposed."),
        _column("Cluster-IP", description="clusterIP is the IP address of the service."),
        _column("External-IP", description="externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service."),
        _column("Port(s)", description="The list of ports that are exposed by this service."),
        _age_column(),
        _column("Selector", description="Route service traffic to pods with label keys and values matching this selector.", priority=1),
    ],
    "configmaps": [
        _name_column(),
        _column("Data", description="Data contains the configuration data."),
        _age_column(),
    ],
    "secrets": [
        _name_column(),
        _column("Type", description="Used to facilitate programmatic handling of secret data."),
        _column("Data", description="Data contains the secret data."),
        _age_column(),
    ],
    "events": [
        _column("Last Seen", description="The time at which the most recent occurrence of this event was recorded."),
        _column("Type", description="Type of this event (Normal, Warning), new types could be added in the future"),
        _column("Reason", description="This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
        _column("Object", description="The object that this event is about."),
        _column("Subobject", description="If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement.", priority=1),
        _column("Source", description="The component reporting this event.", priority=1),
        _column("Message", description="A human-readable description of the status of this operation."),
        _column("First Seen", description="The time at which the event was first recorded.", priority=1),
        _column("Count", description="The number of times this event has occurred.", priority=1),
        _name_column(priority=1),
    ],
    "namespaces": [
        _name_column(),
        _column("Status", description="The status of the namespace"),
        _age_column(),
    ],
    "nodes": [
        _name_column(),
        _column("Status", description="The status of the node"),
        _column("Roles", description="The roles of the node"),
        _age_column(),
        _column("Version", description="Kubelet Version reported by the node."),
        _column("Internal-IP", description="List of addresses reachable to the node.", priority=1),
        _column("External-IP", description="List of addresses reachable to the node.", priority=1),
        _column("OS-Image", description="OS Image reported by the node from /etc/os-release.", priority=1),
        _column("Kernel-Version", description="Kernel Version reported by the node from 'uname -r'.", priority=1),
        _column("Container-Runtime", description="ContainerRuntime Version reported by the node.", priority=1),
    ],
    "customresourcedefinitions": [
        _name_column(),
        _column("Created At", "date", description=_CREATION_DESCRIPTION),
    ],
    "serviceaccounts": [
        _name_column(),
        _column("Secrets", description="Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use."),
        _age_column(),
    ],
    "endpoints": [
        _name_column(),
        _column("Endpoints", description="The set of all endpoints is the union of all subsets."),
        _age_column(),
    ],
    "leases": [
        _name_column(),
        _column("Holder", description="holderIdentity contains the identity of the holder of a current lease."),
        _age_column(),
    ],
}


def _get(obj: Any, *keys: Any, default: Any = None) -> Any:
    for key in keys:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
        if obj is None:
            return default
    return obj


def _pod_cells(pod: dict[str, Any], now: datetime) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    containers = spec.get("containers") or []
    total, ready, restarts = len(containers), 0, 0
    last_restart: datetime | None = None
    phase = status.get("phase") or ""
    reason = status.get("reason") or phase
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "SchedulingGated":
            reason = "SchedulingGated"
    initializing = False
    init_count = len(spec.get("initContainers") or [])
    for index, container in enumerate(status.get("initContainerStatuses") or []):
        restarts += int(container.get("restartCount") or 0)
        state = container.get("state") or {}
        terminated, waiting = state.get("terminated"), state.get("waiting")
        if terminated and terminated.get("exitCode", 0) == 0:
            continue
        if terminated:
            if terminated.get("reason"):
                reason = "Init:" + terminated["reason"]
            elif terminated.get("signal"):
                reason = f"Init:Signal:{terminated['signal']}"
            else:
                reason = f"Init:ExitCode:{terminated.get('exitCode', 0)}"
        elif waiting and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{index}/{init_count}"
        initializing = True
        break
    if not initializing:
        restarts = 0
        has_running = False
        for container in reversed(status.get("containerStatuses") or []):
            restarts += int(container.get("restartCount") or 0)
            finished = parse_time(_get(container, "lastState", "terminated", "finishedAt"))
            if finished and (last_restart is None or finished > last_restart):
                last_restart = finished
            state = container.get("state") or {}
            waiting, terminated = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason"):
                reason = waiting["reason"]
            elif terminated and terminated.get("reason"):
                reason = terminated["reason"]
            elif terminated:
                reason = (f"Signal:{terminated['signal']}" if terminated.get("signal")
                          else f"ExitCode:{terminated.get('exitCode', 0)}")
            elif container.get("ready") and state.get("running") is not None:
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in status.get("conditions") or [])
            reason = "Running" if pod_ready else "NotReady"
    deleting = _get(pod, "metadata", "deletionTimestamp")
    if deleting and status.get("reason") == "NodeLost":
        reason = "Unknown"
    elif deleting and phase not in ("Succeeded", "Failed"):
        reason = "Terminating"
    restarts_text = str(restarts)
    if restarts and last_restart is not None:
        restarts_text = f"{restarts} ({human_duration((_aware(now) - last_restart).total_seconds())} ago)"
    pod_ips = status.get("podIPs") or []
    pod_ip = (pod_ips[0].get("ip") if pod_ips else status.get("podIP")) or "<none>"
    gates = spec.get("readinessGates") or []
    if gates:
        true_conditions = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
        gates_text = f"{sum(1 for g in gates if g.get('conditionType') in true_conditions)}/{len(gates)}"
    else:
        gates_text = "<none>"
    return [_get(pod, "metadata", "name", default=""), f"{ready}/{total}", reason, restarts_text,
            format_age(_get(pod, "metadata", "creationTimestamp"), now), pod_ip,
            spec.get("nodeName") or "<none>", status.get("nominatedNodeName") or "<none>", gates_text]


def _aware(now: datetime) -> datetime:
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


def _service_cells(service: dict[str, Any], now: datetime) -> list[Any]:
    spec = service.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    external_ips = spec.get("externalIPs") or []
    if kind in ("ClusterIP", "NodePort"):
        external = ",".join(external_ips) or "<none>"
    elif kind == "LoadBalancer":
        ingress = sorted({i.get("ip") or i.get("hostname") for i in
                          _get(service, "status", "loadBalancer", "ingress", default=[]) if i.get("ip") or i.get("hostname")})
        external = ",".join(ingress + external_ips) or "<pending>"
    elif kind == "ExternalName":
        external = spec.get("externalName", "")
    else:
        external = "<unknown>"
    ports = []
    for port in spec.get("ports") or []:
        text = f"{port.get('port')}"
        if port.get("nodePort"):
            text += f":{port['nodePort']}"
        ports.append(f"{text}/{port.get('protocol', 'TCP')}")
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
    return [_get(service, "metadata", "name", default=""), kind, cluster_ips[0] if cluster_ips else "<none>",
            external, ",".join(ports) or "<none>", format_age(_get(service, "metadata", "creationTimestamp"), now),
            selector]


def _event_cells(event: dict[str, Any], now: datetime) -> list[Any]:
    first = event.get("firstTimestamp")
    first_text = format_age(first, now) if first else format_age(event.get("eventTime"), now)
    last = event.get("lastTimestamp")
    last_text = format_age(last, now) if last else first_text
    count = event.get("count") or 0
    series = event.get("series")
    if series:
        last_text = format_age(series.get("lastObservedTime"), now)
        count = series.get("count") or 0
    elif count == 0:
        count = 1
    involved = event.get("involvedObject") or {}
    kind = (involved.get("kind") or "").lower()
    target = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = event.get("source") or {}
    component = source.get("component") or event.get("reportingComponent") or ""
    host = source.get("host") or event.get("reportingInstance") or ""
    source_text = f"{component}, {host}" if host else component
    return [last_text, event.get("type", ""), event.get("reason", ""), target, involved.get("fieldPath", ""),
            source_text, str(event.get("message", "")).strip(), first_text, int(count),
            _get(event, "metadata", "name", default="")]


def _node_cells(node: dict[str, Any], now: datetime) -> list[Any]:
    status = node.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None:
        state = "Unknown"
    else:
        state = "Ready" if ready.get("status") == "True" else "NotReady"
    if _get(node, "spec", "unschedulable"):
        state += ",SchedulingDisabled"
    labels = _get(node, "metadata", "labels", default={})
    roles = sorted({key[len("node-role.kubernetes.io/"):] for key in labels
                    if key.startswith("node-role.kubernetes.io/") and key != "node-role.kubernetes.io/"}
                   | ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set()))
    addresses = status.get("addresses") or []
    internal = next((a.get("address") for a in addresses if a.get("type") == "InternalIP"), "<none>")
    external = next((a.get("address") for a in addresses if a.get("type") == "ExternalIP"), "<none>")
    info = status.get("nodeInfo") or {}
    return [_get(node, "metadata", "name", default=""), state, ",".join(roles) or "<none>",
            format_age(_get(node, "metadata", "creationTimestamp"), now), info.get("kubeletVersion", ""),
            internal, external, info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>"]


def _endpoints_text(endpoints: dict[str, Any]) -> str:
    pieces: list[str] = []
    shown, total = 0, 0
    for subset in endpoints.get("subsets") or []:
        ports = subset.get("ports") or [None]
        for address in subset.get("addresses") or []:
            for port in ports:
                total += 1
                if shown < 3:
                    pieces.append(f"{address.get('ip')}:{port.get('port')}" if port else address.get("ip", ""))
                    shown += 1
    if not pieces:
        return "<none>"
    text = ",".join(pieces)
    return text + f" + {total - shown} more..." if total > shown else text


def row_cells(resource: str, columns: list[dict[str, Any]], obj: dict[str, Any], now: datetime) -> list[Any]:
    """The cells of one object's row; custom resources use the columns' JSONPaths.

    Missing custom-resource values are ``None`` (JSON null), as kube-apiserver sends them.
    """
    meta = obj.get("metadata") or {}
    name, created = meta.get("name", ""), meta.get("creationTimestamp")
    if any("jsonPath" in column for column in columns):
        return [name] + [_custom_cell(column, obj, now) for column in columns[1:]]
    if resource == "pods":
        return _pod_cells(obj, now)
    if resource == "services":
        return _service_cells(obj, now)
    if resource == "configmaps":
        return [name, len(obj.get("data") or {}) + len(obj.get("binaryData") or {}), format_age(created, now)]
    if resource == "secrets":
        return [name, obj.get("type", ""), len(obj.get("data") or {}), format_age(created, now)]
    if resource == "events":
        return _event_cells(obj, now)
    if resource == "namespaces":
        return [name, _get(obj, "status", "phase", default=""), format_age(created, now)]
    if resource == "nodes":
        return _node_cells(obj, now)
    if resource == "customresourcedefinitions":
        return [name, _rfc3339(created)]
    if resource == "serviceaccounts":
        return [name, len(obj.get("secrets") or []), format_age(created, now)]
    if resource == "endpoints":
        return [name, _endpoints_text(obj), format_age(created, now)]
    if resource == "leases":
        return [name, _get(obj, "spec", "holderIdentity", default=""), format_age(created, now)]
    return [name, format_age(created, now)]


def to_table(resource: str, columns: list[dict[str, Any]], objects: list[dict[str, Any]], now: datetime,
             include_object: str = "Metadata", resource_version: str | None = None) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of ``objects``.

    ``include_object`` is the ``includeObject`` query parameter: "Metadata" (default) attaches a
    PartialObjectMetadata per row, "Object" the whole object, "None" nothing.
    """
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": row_cells(resource, columns, obj, now)}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj.get("metadata") or {}}
        rows.append(row)
    metadata: dict[str, Any] = {}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": [{key: column.get(key, "" if key != "priority" else 0) for key in _COLUMN_KEYS}
                              for column in columns],
        "rows": rows,
    }
