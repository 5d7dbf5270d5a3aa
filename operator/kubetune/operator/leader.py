"""Leader election through a coordination.k8s.io Lease, as client-go's ``leaderelection`` does it.

With several operator replicas, only the holder of the Lease reconciles; the others keep their
watches warm and stand by. The holder renews the Lease every ``retry_seconds``; a replica takes
it once it has not been renewed for ``lease_seconds``. Every write is an update with the Lease's
resourceVersion, so two replicas that race for it cannot both win. A holder that cannot renew
for ``renew_deadline_seconds`` (shorter than the lease) stops acting and exits, so it has
stopped before anyone else may take over: the Deployment restarts it as a standby.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.operator.times import format_time, parse_time

log = logging.getLogger(__name__)

# What a call to the API server may raise besides an answer: the API server is away (restarting,
# unreachable), or did not answer within the client's timeout (kube.OperatorApiClient).
UNANSWERED = (ApiException, urllib3.exceptions.HTTPError, OSError)
LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2


class LeaderElection:
    """``leading`` is set while this replica holds the Lease; ``on_acquired`` is called when it
    takes it, ``on_lost`` (once) when it held it and could not keep it."""

    def __init__(self, api: client.CoordinationV1Api, namespace: str, name: str, identity: str,
                 on_lost: Callable[[], None], on_acquired: Callable[[], None] = lambda: None,
                 lease_seconds: int = LEASE_SECONDS,
                 renew_deadline_seconds: int = RENEW_DEADLINE_SECONDS, retry_seconds: float = RETRY_SECONDS) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.on_lost, self.on_acquired = on_lost, on_acquired
        self.lease_seconds, self.renew_deadline_seconds = lease_seconds, renew_deadline_seconds
        self.retry_seconds = retry_seconds
        self.leading = asyncio.Event()
        self._renewed = 0.0  # time.monotonic() of the last successful write of the Lease

    def acting(self) -> bool:
        """Whether this replica may act now: it holds the Lease and renewed it within the renew
        deadline. A replica frozen (SIGSTOP, a stalled VM) past it learns so here, before its
        next pass, not only when its election loop runs again."""
        return self.leading.is_set() and time.monotonic() - self._renewed < self.renew_deadline_seconds

    async def run(self) -> None:
        renewed = datetime.now(UTC)
        while True:
            try:
                held = await asyncio.to_thread(self._try_acquire_or_renew)
            except UNANSWERED as error:  # the API is unwell: try again; a holder counts down
                # (Not only ApiException: a refused connection or a timeout ended this loop, and
                # with it the renewals: the holder stopped acting but never stood down.)
                log.warning("lease %s/%s: %s", self.namespace, self.name, getattr(error, "reason", None) or error)
                held = False
            now = datetime.now(UTC)
            if held:
                renewed = now
                self._renewed = time.monotonic()
                if not self.leading.is_set():
                    log.info("acquired lease %s/%s as %s: this replica acts", self.namespace, self.name,
                             self.identity)
                    self.leading.set()
                    self.on_acquired()
            elif self.leading.is_set() and now - renewed >= timedelta(seconds=self.renew_deadline_seconds):
                log.error("lost lease %s/%s: stopping, to restart as a standby", self.namespace, self.name)
                self.leading.clear()
                self.on_lost()
                return
            await asyncio.sleep(self.retry_seconds)

    def release(self) -> None:
        """Give the Lease up on the way out (an upgrade, a drained node), so a standby takes
        over at once rather than after it expires. Best effort: it expires anyway."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            now = _micro(datetime.now(UTC))
            self.api.replace_namespaced_lease(self.name, self.namespace, {
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": now, "renewTime": now,
                         "leaseTransitions": lease.spec.lease_transitions or 0}})
            log.info("released lease %s/%s", self.namespace, self.name)
        except UNANSWERED as error:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name,
                        getattr(error, "reason", None) or error)

    def _try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            return self._create(now)
        spec = lease.spec
        holder = spec.holder_identity
        last = spec.renew_time or spec.acquire_time
        expired = last is None or now - _aware(last) >= timedelta(seconds=spec.lease_duration_seconds or 0)
        if holder not in (None, "", self.identity) and not expired:
            return False
        body: dict[str, Any] = {
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "resourceVersion": lease.metadata.resource_version},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                     "renewTime": _micro(now),
                     "acquireTime": _micro(_aware(spec.acquire_time) if holder == self.identity
                                                      and spec.acquire_time else now),
                     "leaseTransitions": (spec.lease_transitions or 0) + (holder != self.identity)},
        }
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as error:
            if error.status == 409:  # another replica wrote it first
                return False
            raise
        return True

    def _create(self, now: datetime) -> bool:
        body = {"metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                         "acquireTime": _micro(now), "renewTime": _micro(now),
                         "leaseTransitions": 0}}
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True


def _micro(moment: datetime) -> str:
    return format_time(moment, precise=True)  # a Lease's times are metav1.MicroTime


def _aware(moment: datetime | str) -> datetime:
    if isinstance(moment, str):
        return parse_time(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
