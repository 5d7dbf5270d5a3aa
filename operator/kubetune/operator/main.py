"""Entry point: ``kubetune operator`` (wired by the top-level CLI) or ``python -m kubetune.operator``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from kubetune.operator.settings import OperatorSettings


def run(
    namespace: str | None = None,
    leader_elect: str | None = None,
    liveness_port: int | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the operator until interrupted; ``namespace`` None watches every namespace.

    ``leader_elect`` names the Lease (in $POD_NAMESPACE, else the watched namespace, else
    default) that replicas elect a leader through (None: the only instance). Only the holder
    acts; the others keep their watches and take over within about 15 s of its loss.
    ``metrics_port`` None takes $KUBETUNE_METRICS_PORT (default 8080); 0 serves no metrics.
    Raises OSError when the metrics port is taken.
    """
    import kopf
    from kubetune.operator import handlers  # noqa: F401  (registers the handlers with kopf)
    from kubetune.operator.metrics import OperatorMetrics

    settings = OperatorSettings.from_env()
    if namespace is not None:
        settings = dataclasses.replace(settings, namespace=namespace)
    if metrics_port is not None:
        settings = dataclasses.replace(settings, metrics_port=metrics_port)
    metrics = OperatorMetrics()
    metrics.serve(settings.metrics_port)
    liveness = liveness_port or settings.liveness_port
    lease_namespace = os.environ.get("POD_NAMESPACE") or settings.namespace or "default"
    kopf.run(
        # Replicas elect a leader through a Lease (leader.py), not kopf's peering: a keep-alive
        # in which two replicas that start together both act until they see each other.
        standalone=True,
        clusterwide=settings.namespace is None,
        namespaces=[settings.namespace] if settings.namespace else (),
        liveness_endpoint=f"http://0.0.0.0:{liveness}/healthz" if liveness else None,
        memo=kopf.Memo(settings=settings, metrics=metrics, lease=leader_elect, lease_namespace=lease_namespace),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="watch only this namespace (default: $KUBETUNE_NAMESPACE, else all namespaces)",
    )
    parser.add_argument(
        "--leader-elect",
        metavar="LEASE",
        default=None,
        help="run as one of several replicas: elect a leader through the coordination.k8s.io Lease LEASE in "
        "$POD_NAMESPACE (else the watched namespace, else default); the holder acts, the others stand by",
    )
    parser.add_argument("--liveness-port", type=int, default=None, help="serve /healthz on this port")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the operator's Prometheus /metrics on this port (default: $KUBETUNE_METRICS_PORT, else 8080; 0 = off)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def main(args: argparse.Namespace) -> int:
    from kubetune.operator.kube import NoCredentialsError, load_credentials
    from kubetune.operator.settings import SettingsError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        OperatorSettings.from_env()
        load_credentials()  # fail here in one line rather than inside kopf's startup
    except (NoCredentialsError, SettingsError) as error:
        print(f"kubetune operator: {error}", file=sys.stderr)
        return 2
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        print(f"kubetune operator: --metrics-port {metrics_port} is not a port; use 0 (off) or 1..65535", file=sys.stderr)
        return 2
    try:
        run(
            namespace=args.namespace,
            leader_elect=args.leader_elect,
            liveness_port=args.liveness_port,
            metrics_port=metrics_port,
        )
    except OSError as error:
        port = metrics_port if metrics_port is not None else OperatorSettings.from_env().metrics_port
        print(
            f"kubetune operator: cannot serve metrics on port {port} ({error.strerror or error}); "
            "choose another with --metrics-port (or KUBETUNE_METRICS_PORT), or 0 to turn metrics off",
            file=sys.stderr,
        )
        return 2
    return 0
