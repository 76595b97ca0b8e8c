"""A TLS-only real Redis server for the tests, with a throwaway certificate authority.

:func:`make_certificates` writes a CA and a server certificate for 127.0.0.1/localhost, made in
the test with the ``cryptography`` package (test extra); nothing is fetched or kept.
:class:`TlsRedisServer` starts ``redis-server --port 0 --tls-port P`` (no plaintext listener at
all), optionally with ACL users, and stops it by pid. :class:`tiercache.server.RedisServer` cannot
be used for it: it probes readiness over plaintext.

ACL: the server starts with an ``admin`` user (all commands, for the test's own checks) and the
``users`` given, then ``default`` is switched off, so every connection must authenticate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from tiercache.server import _pdeathsig_preexec, find_server_binary

ADMIN_PASSWORD = "admin-Pa55word-for-tests"


def make_certificates(directory: Path) -> dict[str, Path]:
    """A fresh CA and a server certificate signed by it; returns the PEM files' paths.

    Keys: ``ca`` (the CA certificate, for clients' ``ssl_ca_certs`` and the server's
    ``tls-ca-cert-file``), ``cert`` and ``key`` (the server's).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tiercache test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = {
        "ca": directory / "ca.pem",
        "cert": directory / "server.pem",
        "key": directory / "key.pem",
    }
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    os.chmod(paths["key"], 0o600)
    return paths


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TlsRedisServer:
    """``redis-server`` listening on a TLS port only, with ACL users; stopped by pid."""

    def __init__(self, *, users: Sequence[str] = (), extra_args: Sequence[str] = ()) -> None:
        """``users``: ``ACL SETUSER`` rules, each a string like ``"app on >pw ~app:* +get"``."""
        self.users = tuple(users)
        self.extra_args = tuple(extra_args)
        self.port = 0
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="tiercache-tls-"))
        self.certs = make_certificates(self._dir)

    @property
    def ca(self) -> str:
        """The CA certificate file a client must trust."""
        return str(self.certs["ca"])

    def url(self, user: str, password: str, db: int = 0, ca: str | None = None) -> str:
        """A ``rediss://`` URL for ``user`` that trusts the test CA (or the CA file ``ca``)."""
        auth = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        query = urllib.parse.urlencode({"ssl_ca_certs": ca or self.ca})
        return f"rediss://{auth}@127.0.0.1:{self.port}/{db}?{query}"

    def client(self, user: str = "admin", password: str = ADMIN_PASSWORD, **kw: Any) -> redis.Redis:
        """A TLS client (2 s timeouts), by default as the admin user."""
        kw.setdefault("socket_timeout", 2.0)
        kw.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            username=user,
            password=password,
            ssl=True,
            ssl_ca_certs=self.ca,
            **kw,
        )

    def start(self) -> TlsRedisServer:
        """Start (retrying another port if the chosen one was taken), set up the ACL users."""
        last = ""
        for _ in range(5):
            self.port = _free_port()
            if self._spawn():
                self._set_up_users()
                return self
            last = self.log()
            self.stop()
        raise RuntimeError(f"the TLS redis-server did not start; log:\n{last}")

    def _spawn(self) -> bool:
        cmd = [
            find_server_binary(),
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.certs["cert"]),
            "--tls-key-file", str(self.certs["key"]),
            "--tls-ca-cert-file", self.ca,
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            preexec_fn=_pdeathsig_preexec(),
            close_fds=True,
        )
        self.pid = self._proc.pid
        probe = self.client(user="default", password="", socket_timeout=1.0)
        deadline = time.monotonic() + 10.0
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False
                try:
                    if int(probe.info("server")["process_id"]) == self.pid:
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    probe.connection_pool.disconnect()
                time.sleep(0.02)
            return False
        finally:
            probe.close()

    def _set_up_users(self) -> None:
        with contextlib.closing(self.client(user="default", password="")) as setup:
            setup.execute_command(
                "ACL", "SETUSER", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"
            )
        with contextlib.closing(self.client()) as admin:
            for rule in self.users:
                admin.execute_command("ACL", "SETUSER", *rule.split())
            admin.execute_command("ACL", "SETUSER", "default", "off", "resetpass", "-@all")
            admin.execute_command("ACL", "LOG", "RESET")

    def log(self) -> str:
        """The server's log so far."""
        try:
            return (self._dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        self.pid = None

    def close(self) -> None:
        """Stop the server and remove its certificates and files."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def tls_server(*, users: Sequence[str] = (), extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """A started :class:`TlsRedisServer`, closed on exit (skips if the binary lacks TLS)."""
    server = TlsRedisServer(users=users, extra_args=extra_args)
    try:
        try:
            server.start()
        except RuntimeError as err:
            text = str(err).lower()
            no_tls = ("bad directive", "not support", "unknown")
            if "tls" in text and any(s in text for s in no_tls):
                pytest.skip(f"this server binary was built without TLS: {err}")
            raise
        yield server
    finally:
        server.close()
