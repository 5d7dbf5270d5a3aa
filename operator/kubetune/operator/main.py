"""Entry point: ``kubetune operator`` (wired by the top-level CLI) or ``python -m kubetune.operator``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from kubetune.operator.settings import OperatorSettings


def run(namespace: str | None = None, standalone: bool = True, liveness_port: int | None = None) -> None:
    """Run the operator until interrupted; ``namespace`` None watches every namespace.

    ``standalone`` skips kopf's peering (no other operator instance to coordinate with).
    """
    import kopf
    from kubetune.operator import handlers

    settings = OperatorSettings.from_env()
    if namespace is not None:
        settings = dataclasses.replace(settings, namespace=namespace)
    handlers.use_settings(settings)
    liveness = liveness_port or settings.liveness_port
    kopf.run(
        standalone=standalone,
        clusterwide=settings.namespace is None,
        namespaces=[settings.namespace] if settings.namespace else (),
        liveness_endpoint=f"http://0.0.0.0:{liveness}/healthz" if liveness else None,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="watch only this namespace (default: $KUBETUNE_NAMESPACE, else all namespaces)",
    )
    parser.add_argument(
        "--peering",
        action="store_true",
        help="coordinate with other operator replicas through kopf peering (needs the peering CRDs)",
    )
    parser.add_argument("--liveness-port", type=int, default=None, help="serve /healthz on this port")
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
    run(namespace=args.namespace, standalone=not args.peering, liveness_port=args.liveness_port)
    return 0
