"""TLS and mutual TLS with certificate files given as flags (certificates made with the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.harness import SERVICE, running_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(d: Path) -> None:
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip


def _check(address: str, creds: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status)


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    _certificates(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    client_key, client_cert = (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
    server_files = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"))
    serving = health_pb2.HealthCheckResponse.SERVING

    with running_server(tmp_path, *server_files) as server:
        assert _check(server.address, grpc.ssl_channel_credentials(root_certificates=ca)) == serving
        with pytest.raises(grpc.RpcError) as info:
            _check(server.address, None)  # plaintext to a TLS port
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    with running_server(tmp_path, *server_files, "--tls-client-ca", str(tmp_path / "ca.pem")) as server:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=client_key, certificate_chain=client_cert
        )
        assert _check(server.address, with_cert) == serving
        with pytest.raises(grpc.RpcError) as info:
            _check(server.address, grpc.ssl_channel_credentials(root_certificates=ca))  # no client certificate
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
