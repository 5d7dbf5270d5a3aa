"""The local cluster's certificates and keys, made fresh at every `up` (cryptography).

One CA signs everything, as kubeadm's layout does, with one identity per component so that the
API server's Node and RBAC authorizers see the same users a real cluster has:

- ``kubernetes-admin`` in ``system:masters``: the user's kubeconfig;
- ``system:kube-controller-manager`` and ``system:kube-scheduler``: their kubeconfigs;
- ``system:node:<node>`` in ``system:nodes``: our node agent (Node authorizer, NodeRestriction);
- ``kube-apiserver-kubelet-client``: the API server calling the node agent (``kubectl logs``);
- etcd's serving certificate and the API server's etcd client certificate (etcd refuses clients
  without one, so another user on this machine cannot read the cluster's Secrets from etcd);
- the service-account signing key pair (bound tokens for pods).

ECDSA P-256 throughout: every Kubernetes component accepts it, and it takes milliseconds to
generate where RSA takes a noticeable part of `up`.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubetune.localcluster.hostsfile import API_SERVICE_NAMES

VALIDITY = datetime.timedelta(days=365)
ADMIN_USER = "kubernetes-admin"
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    directory: Path
    ca: KeyPair
    apiserver: KeyPair
    apiserver_etcd_client: KeyPair
    apiserver_kubelet_client: KeyPair
    etcd_server: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    scheduler: KeyPair
    node_client: KeyPair
    node_server: KeyPair
    service_account_key: Path
    service_account_public_key: Path

    @property
    def ca_data(self) -> bytes:
        return self.ca.cert.read_bytes()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


class _Issuer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        # Back-dated a little: a component whose clock reads a second earlier must not see a
        # certificate from the future.
        self.not_before = now - datetime.timedelta(minutes=5)
        self.not_after = now + VALIDITY
        self.name = _name("kubetune-local-ca")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pair = self._write("ca", self.cert, self.key)

    def _write(self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(_key_pem(key))
        return KeyPair(cert_path, key_path)

    def issue(
        self,
        stem: str,
        common_name: str,
        organization: str | None = None,
        *,
        server: bool = False,
        client: bool = False,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> KeyPair:
        key = _new_key()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, content_commitment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips or [])]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return self._write(stem, builder.sign(self.key, hashes.SHA256()), key)


def create(
    directory: Path, *, api_addresses: list[str], service_ip: str, node_name: str, node_address: str
) -> ClusterPKI:
    """Write a new CA and every certificate and key the cluster needs into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    issuer = _Issuer(directory)
    loopback = ["127.0.0.1"]
    sa_key = _new_key()
    sa_key_path = directory / "sa.key"
    sa_key_path.touch(mode=0o600)
    sa_key_path.write_bytes(_key_pem(sa_key))
    sa_pub_path = directory / "sa.pub"
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ClusterPKI(
        directory=directory,
        ca=issuer.pair,
        apiserver=issuer.issue(
            "apiserver", "kube-apiserver", server=True,
            dns=[*API_SERVICE_NAMES, "localhost"], ips=[*loopback, *api_addresses, service_ip],
        ),
        apiserver_etcd_client=issuer.issue("apiserver-etcd-client", "kube-apiserver-etcd-client", client=True),
        apiserver_kubelet_client=issuer.issue(
            "apiserver-kubelet-client", KUBELET_CLIENT_USER, "system:masters", client=True
        ),
        etcd_server=issuer.issue("etcd-server", "etcd", server=True, dns=["localhost"], ips=loopback),
        admin=issuer.issue("admin", ADMIN_USER, "system:masters", client=True),
        controller_manager=issuer.issue(
            "controller-manager", "system:kube-controller-manager", client=True
        ),
        scheduler=issuer.issue("scheduler", "system:kube-scheduler", client=True),
        node_client=issuer.issue("node-client", f"system:node:{node_name}", "system:nodes", client=True),
        node_server=issuer.issue(
            "node-server", f"system:node:{node_name}", server=True, dns=[node_name], ips=[node_address]
        ),
        service_account_key=sa_key_path,
        service_account_public_key=sa_pub_path,
    )
