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
    return refs


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
        target = directory / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[key])
        os.chmod(target, mode)


def materialise_volumes(
    pod: Mapping[str, Any], pod_dir: Path, objects: Lookup, facts: PodFacts
) -> dict[str, Path]:
    """Write every volume of the pod under ``pod_dir/volumes/<name>``; returns name -> dir.

    emptyDir directories survive container restarts (only created if missing); configMap,
    secret and downwardAPI contents are rewritten each time."""
    volumes: dict[str, Path] = {}
    meta = pod.get("metadata") or {}
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = volume["name"]
        directory = pod_dir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        volumes[name] = directory
        for kind, field, name_key in (
            ("secret", "secret", "secretName"),
            ("configmap", "configMap", "name"),
        ):
            if field not in volume:
                continue
            source = volume[field]
            obj_name = source[name_key]
            if (kind, obj_name) not in objects:
                if source.get("optional", False):
                    continue
                raise ConfigError(f'{_kind_label(kind)} "{obj_name}" not found (volume {name})')
            _write_items(directory, objects[(kind, obj_name)], source, source.get("defaultMode", 0o644))
        if "downwardAPI" in volume:
            source = volume["downwardAPI"]
            for item in source.get("items") or []:
                if "fieldRef" not in item:
                    continue  # resourceFieldRef: no resource accounting locally
                path = item["fieldRef"]["fieldPath"]
                if path in ("metadata.labels", "metadata.annotations"):
                    values = meta.get(path.split(".")[1]) or {}
                    text = "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
                else:
                    text = _field_ref(pod, facts, path, f"volume {name}")
                target = directory / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                os.chmod(target, item.get("mode", source.get("defaultMode", 0o644)))
    return volumes


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
