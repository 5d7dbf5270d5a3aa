"""Pure resolution of a pod's configuration: env vars and volume files.

The kubelet fetches the Secrets and ConfigMaps a pod refers to first (see
``referenced_objects``), then these functions turn the pod spec into plain values. A missing
object or key raises ``ConfigError``, which the kubelet reports like Kubernetes does: the
container waits with reason ``CreateContainerConfigError`` and the pod is retried.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kubetune.localcluster.kubelet import devices

Lookup = Mapping[tuple[str, str], Mapping[str, bytes]]  # (kind, name) -> key -> bytes


class ConfigError(Exception):
    """A referenced Secret/ConfigMap (or one of its keys) does not exist (yet)."""


@dataclass(frozen=True)
class PodFacts:
    """Values fieldRef may read that are not in the stored spec."""

    pod_ip: str
    node_name: str
    host_ip: str


def object_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """The decoded key -> bytes contents of a Secret or ConfigMap."""
    data: dict[str, bytes] = {}
    if kind == "secret":
        for key, value in (obj.get("data") or {}).items():
            data[key] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            data[key] = value.encode()
    else:
        for key, value in (obj.get("data") or {}).items():
            data[key] = value.encode()
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value)
    return data


def referenced_objects(pod: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every (kind, name) the pod's env, envFrom and volumes refer to; kind is secret|configmap."""
    spec = pod.get("spec") or {}
    refs: set[tuple[str, str]] = set()
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        for env in container.get("env") or []:
            source = env.get("valueFrom") or {}
            if "secretKeyRef" in source:
                refs.add(("secret", source["secretKeyRef"]["name"]))
            if "configMapKeyRef" in source:
                refs.add(("configmap", source["configMapKeyRef"]["name"]))
        for env_from in container.get("envFrom") or []:
            if "secretRef" in env_from:
                refs.add(("secret", env_from["secretRef"]["name"]))
            if "configMapRef" in env_from:
                refs.add(("configmap", env_from["configMapRef"]["name"]))
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            refs.add(("secret", volume["secret"]["secretName"]))
        if "configMap" in volume:
            refs.add(("configmap", volume["configMap"]["name"]))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                refs.add(("secret", source["secret"]["name"]))
            if "configMap" in source:
                refs.add(("configmap", source["configMap"]["name"]))
    return refs


@dataclass(frozen=True)
class TokenSource:
    """A projected ``serviceAccountToken``: the node agent asks the TokenRequest API for it."""

    audience: str
    expiration_seconds: int

    @classmethod
    def of(cls, projection: Mapping[str, Any]) -> "TokenSource":
        """From a ``serviceAccountToken`` projection, with the API's defaults."""
        return cls(projection.get("audience") or "", int(projection.get("expirationSeconds") or 3600))


def token_sources(pod: Mapping[str, Any]) -> set[TokenSource]:
    found: set[TokenSource] = set()
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        for source in (volume.get("projected") or {}).get("sources") or []:
            token = source.get("serviceAccountToken")
            if token is not None:
                found.add(TokenSource.of(token))
    return found


def _kind_label(kind: str) -> str:
    return "secret" if kind == "secret" else "configmap"


def _key_ref(objects: Lookup, kind: str, ref: Mapping[str, Any], env_name: str) -> str | None:
    name, key = ref["name"], ref["key"]
    optional = bool(ref.get("optional", False))
    if (kind, name) not in objects:
        if optional:
            return None
        raise ConfigError(f'{_kind_label(kind)} "{name}" not found (env {env_name})')
    data = objects[(kind, name)]
    if key not in data:
        if optional:
            return None
        raise ConfigError(
            f"couldn't find key {key} in {_kind_label(kind).capitalize()} "
            f"{name} (env {env_name})"
        )
    return data[key].decode(errors="replace")


def _field_ref(pod: Mapping[str, Any], facts: PodFacts, path: str, env_name: str) -> str:
    meta = pod.get("metadata") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": facts.node_name,
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
        "status.podIP": facts.pod_ip,
        "status.hostIP": facts.host_ip,
    }
    if path in simple:
        return simple[path]
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return (meta.get(source) or {}).get(path[len(prefix) + 2 : -2], "")
    raise ConfigError(f"unsupported fieldRef fieldPath {path!r} (env {env_name})")


def resolve_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], objects: Lookup, facts: PodFacts
) -> dict[str, str]:
    """The container's environment from envFrom then env (later entries win), with
    ``$(VAR)`` references expanded like Kubernetes does."""
    env: dict[str, str] = {}
    for env_from in container.get("envFrom") or []:
        prefix = env_from.get("prefix", "")
        for ref_kind, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
            if ref_kind not in env_from:
                continue
            ref = env_from[ref_kind]
            if (kind, ref["name"]) not in objects:
                if ref.get("optional", False):
                    continue
                raise ConfigError(f'{_kind_label(kind)} "{ref["name"]}" not found (envFrom)')
            for key, value in objects[(kind, ref["name"])].items():
                env[prefix + key] = value.decode(errors="replace")
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = _expand(item.get("value", ""), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            value = _key_ref(objects, "secret", source["secretKeyRef"], name)
        elif "configMapKeyRef" in source:
            value = _key_ref(objects, "configmap", source["configMapKeyRef"], name)
        elif "fieldRef" in source:
            value = _field_ref(pod, facts, source["fieldRef"]["fieldPath"], name)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion; ``$$(VAR)`` escapes; unknown references stay as is."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2 : end]
            out.append(env.get(name, value[i : end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def expand_args(args: list[str], env: Mapping[str, str]) -> list[str]:
    return [_expand(a, env) for a in args]


def _write_items(
    directory: Path, data: Mapping[str, bytes], source: Mapping[str, Any], default_mode: int
) -> None:
    items = source.get("items")
    selected = (
        [(i["key"], i["path"], i.get("mode", default_mode)) for i in items]
        if items
        else [(key, key, default_mode) for key in data]
    )
    for key, rel_path, mode in selected:
        if key not in data:
            raise ConfigError(f"volume item key {key} not found")
        _write_file(directory / rel_path, data[key], mode)


SUPPORTED_VOLUMES = ("emptyDir", "configMap", "secret", "downwardAPI", "projected")


def _object_items(
    directory: Path, objects: Lookup, kind: str, obj_name: str, source: Mapping[str, Any], default_mode: int,
    volume: str,
) -> None:
    if (kind, obj_name) not in objects:
        if source.get("optional", False):
            return
        raise ConfigError(f'{_kind_label(kind)} "{obj_name}" not found (volume {volume})')
    _write_items(directory, objects[(kind, obj_name)], source, default_mode)


def _downward_items(
    directory: Path, pod: Mapping[str, Any], facts: PodFacts, items: list[Mapping[str, Any]], default_mode: int,
    volume: str,
) -> None:
    meta = pod.get("metadata") or {}
    for item in items:
        if "fieldRef" not in item:
            continue  # resourceFieldRef: no resource accounting locally
        path = item["fieldRef"]["fieldPath"]
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            text = "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        else:
            text = _field_ref(pod, facts, path, f"volume {volume}")
        _write_file(directory / item["path"], text.encode(), item.get("mode", default_mode))


def _write_file(target: Path, data: bytes, mode: int) -> None:
    """Replace ``target`` atomically: a process may be reading it (a token being refreshed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    os.replace(temporary, target)


def materialise_volumes(
    pod: Mapping[str, Any], pod_dir: Path, objects: Lookup, facts: PodFacts,
    tokens: Mapping[TokenSource, str] | None = None,
) -> dict[str, Path]:
    """Write every volume of the pod under ``pod_dir/volumes/<name>``; returns name -> dir.

    emptyDir directories survive container restarts (only created if missing); configMap,
    secret, downwardAPI and projected contents are rewritten each time. ``tokens`` holds the
    service-account tokens the node agent obtained for the pod's projected volumes."""
    volumes: dict[str, Path] = {}
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = volume["name"]
        kinds = [k for k in volume if k != "name"]
        if any(k not in SUPPORTED_VOLUMES for k in kinds):
            raise ConfigError(
                f"volume {name}: {', '.join(k for k in kinds if k not in SUPPORTED_VOLUMES)} volumes are not "
                f"supported in local mode (supported: {', '.join(SUPPORTED_VOLUMES)})"
            )
        directory = pod_dir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        volumes[name] = directory
        if "secret" in volume:
            source = volume["secret"]
            _object_items(directory, objects, "secret", source["secretName"], source,
                          source.get("defaultMode", 0o644), name)
        if "configMap" in volume:
            source = volume["configMap"]
            _object_items(directory, objects, "configmap", source["name"], source,
                          source.get("defaultMode", 0o644), name)
        if "downwardAPI" in volume:
            source = volume["downwardAPI"]
            _downward_items(directory, pod, facts, source.get("items") or [], source.get("defaultMode", 0o644), name)
        if "projected" in volume:
            _projected(directory, pod, facts, objects, tokens or {}, volume["projected"], name)
    return volumes


def _projected(
    directory: Path, pod: Mapping[str, Any], facts: PodFacts, objects: Lookup,
    tokens: Mapping[TokenSource, str], projected: Mapping[str, Any], volume: str,
) -> None:
    mode = projected.get("defaultMode", 0o644)
    for source in projected.get("sources") or []:
        if "secret" in source:
            _object_items(directory, objects, "secret", source["secret"]["name"], source["secret"], mode, volume)
        elif "configMap" in source:
            _object_items(directory, objects, "configmap", source["configMap"]["name"], source["configMap"], mode,
                          volume)
        elif "downwardAPI" in source:
            _downward_items(directory, pod, facts, source["downwardAPI"].get("items") or [], mode, volume)
        elif "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            key = TokenSource.of(spec)
            if key not in tokens:
                raise ConfigError(f"volume {volume}: no service account token yet")
            _write_file(directory / spec["path"], tokens[key].encode(), mode)
        else:
            raise ConfigError(f"volume {volume}: projected source {sorted(source)} is not supported in local mode")


def container_mounts(
    container: Mapping[str, Any], volumes: Mapping[str, Path]
) -> list[tuple[str, str, bool]]:
    """(source path, mountPath, readOnly) for each of the container's volumeMounts."""
    mounts: list[tuple[str, str, bool]] = []
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise ConfigError(
                f"volumeMount {mount['name']!r} refers to no volume of the pod; "
                "add it to spec.volumes"
            )
        source = volumes[mount["name"]]
        if mount.get("subPath"):
            source = source / mount["subPath"]
        mounts.append((str(source), mount["mountPath"], bool(mount.get("readOnly", False))))
    return mounts


def _gpu_limit(container: Mapping[str, Any]) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get(devices.RESOURCE, 0) or 0)


def gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs the pod holds while it runs: its largest init container or all its containers."""
    spec = pod.get("spec") or {}
    main = sum(_gpu_limit(c) for c in spec.get("containers") or [])
    return max([main, *(_gpu_limit(c) for c in spec.get("initContainers") or [])])


def gpu_env(container: Mapping[str, Any], gpus: list[int], node_gpus: int) -> dict[str, str]:
    """Which GPUs a container sees: the pod's when it asks for any, none otherwise."""
    if node_gpus == 0:
        return {}
    if _gpu_limit(container) > 0:
        visible = ",".join(str(index) for index in gpus)
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible}
    return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
