"""Operator-wide settings, read once from environment variables (set by the Helm chart or
``kubetune local up``). Per-job choices live in the FineTuneJob; these are the platform defaults.

=================================  =========================  ==================================
Variable                           Default                    Meaning
=================================  =========================  ==================================
KUBETUNE_S3_ENDPOINT               (unset = AWS)              S3 endpoint for jobs whose
                                                              spec.storage.endpoint is absent
KUBETUNE_TRAINER_IMAGE             kubetune/trainer:0.1.0     image for jobs that keep the CRD's
                                                              default spec.workers.image
KUBETUNE_NAMESPACE                 (unset = all namespaces)   namespace the operator watches
KUBETUNE_TRAINER_METRICS_PORT      9400                       port rank 0 serves /metrics on
KUBETUNE_LIVENESS_PORT             (unset = off)              operator /healthz port
KUBETUNE_METRICS_PORT              8080                       operator /metrics port; 0 = off
                                                              (``--metrics-port`` overrides it)
KUBETUNE_RESTART_BACKOFF_SECONDS   10                         wait before a failed gang's first
                                                              restart; doubles each restart, up
                                                              to 300 s
KUBETUNE_API_TIMEOUT_SECONDS       70                         longest wait on the API server: for
                                                              the answer to a request, and for
                                                              any event on a watch (bookmarks
                                                              come every minute); then retried,
                                                              or the watch reopened. 1..3600
=================================  =========================  ==================================

The API timeout is for connections that die without a word (a half-open TCP connection, a
load balancer that accepts and never forwards): the API server itself answers every request
within 60 s (its ``--request-timeout``) and sends each watch a bookmark every minute, so 70 s
gives up on nothing that is alive. Tests shorten it to see a dead connection replaced quickly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kubetune.api.spec import DEFAULT_TRAINER_IMAGE  # a job that keeps it gets the platform's image

API_TIMEOUT_SECONDS = 70
"""Above the API server's own request timeout (60 s) and its watch bookmark interval (a minute)."""


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    s3_endpoint: str | None = None
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    namespace: str | None = None
    trainer_metrics_port: int = 9400
    liveness_port: int | None = None
    metrics_port: int = 8080
    restart_backoff_seconds: int = 10
    api_timeout_seconds: int = API_TIMEOUT_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        return cls(
            s3_endpoint=_text(env, "KUBETUNE_S3_ENDPOINT"),
            trainer_image=_text(env, "KUBETUNE_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            namespace=_text(env, "KUBETUNE_NAMESPACE"),
            trainer_metrics_port=_port(env, "KUBETUNE_TRAINER_METRICS_PORT") or 9400,
            liveness_port=_port(env, "KUBETUNE_LIVENESS_PORT"),
            metrics_port=_metrics_port(env),
            restart_backoff_seconds=_seconds(env, "KUBETUNE_RESTART_BACKOFF_SECONDS", 10),
            api_timeout_seconds=_seconds(env, "KUBETUNE_API_TIMEOUT_SECONDS", API_TIMEOUT_SECONDS, lowest=1),
        )


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _seconds(env: Mapping[str, str], name: str, default: int, lowest: int = 0) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    if not raw.isdigit() or not lowest <= int(raw) <= 3600:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds; set it to {lowest}..3600 or unset it")
    return int(raw)


def _metrics_port(env: Mapping[str, str]) -> int:
    port = _port(env, "KUBETUNE_METRICS_PORT", allow_zero=True)
    return 8080 if port is None else port


def _port(env: Mapping[str, str], name: str, allow_zero: bool = False) -> int | None:
    raw = _text(env, name)
    if raw is None:
        return None
    lowest = 0 if allow_zero else 1
    if not raw.isdigit() or not lowest <= int(raw) <= 65535:
        hint = "0 (off) or 1..65535" if allow_zero else "1..65535"
        raise SettingsError(f"{name}={raw!r} is not a port number; set it to {hint} or unset it")
    return int(raw)
