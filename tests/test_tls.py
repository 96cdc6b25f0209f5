"""NBD over TLS through nbdkit's own TLS: x509 (QEMU's tls-creds-x509 layout) and PSK, with real clients."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import nbd
import pytest

from tests.support.commands import ROOT, VDISK, run

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_x509(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost, named as QEMU and nbdkit expect them."""
    directory.mkdir()
    ssl = lambda *a: run("openssl", *a, cwd=directory)  # noqa: E731
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vdisk test CA",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server-key.pem",
        "-out", "server.csr")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server-cert.pem")
    return directory


def _serve_tcp(image: Path, port: int, *extra: str) -> subprocess.Popen:
    pid = image.parent / "tls.pid"
    proc = subprocess.Popen([*VDISK, "serve", str(image), "--bind", "127.0.0.1", "--port", str(port),
                             "--pid-file", str(pid), *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if pid.exists():
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        subprocess.run(["sleep", "0.05"])
    proc.kill()
    raise AssertionError("vdisk serve did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def test_x509_tls_required_refuses_plaintext_and_serves_qemu_and_libnbd(chain4, tmp_path):
    certs = _make_x509(tmp_path / "pki")
    port = _free_port()
    proc = _serve_tcp(chain4["D"], port, "--tls-creds", str(certs))
    try:
        plain = nbd.NBD()
        plain.set_tls(nbd.TLS_DISABLE)
        with pytest.raises(nbd.Error):
            plain.connect_uri(f"nbd://127.0.0.1:{port}/")
            plain.pread(512, 0)

        client = nbd.NBD()
        client.set_tls(nbd.TLS_REQUIRE)
        client.set_tls_certificates(str(certs))
        client.set_tls_verify_peer(True)
        client.connect_tcp("127.0.0.1", str(port))
        assert client.get_tls_negotiated()
        assert client.pread(4096, 1 << 20) == bytes([0xB2]) * 4096  # B's pattern through the chain
        client.pwrite(b"\x5a" * 4096, 0)
        client.flush()
        client.shutdown()

        client_dir = tmp_path / "client-pki"
        client_dir.mkdir()
        (client_dir / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
        out = run("qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
                  "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                  "tls-creds=tls0", "-c", "read -P 0x5a 0 4k", "-c", "read -P 0xb2 1M 4k").stdout
        assert "Pattern verification failed" not in out and out.count("read 4096/4096") == 2, out
    finally:
        _stop(proc)
    run("qemu-img", "check", chain4["D"])


def test_psk_tls_serves_libnbd_and_refuses_a_wrong_key(chain4, tmp_path):
    key = os.urandom(32).hex()
    psk = tmp_path / "keys.psk"
    psk.write_text(f"vdisk:{key}\n")
    psk.chmod(0o600)
    port = _free_port()
    proc = _serve_tcp(chain4["D"], port, "--tls-psk", str(psk))
    try:
        client = nbd.NBD()
        client.set_tls(nbd.TLS_REQUIRE)
        client.set_tls_username("vdisk")
        client.set_tls_psk_file(str(psk))
        client.connect_tcp("127.0.0.1", str(port))
        assert client.get_tls_negotiated()
        assert client.pread(4096, 0) == bytes([0xA1]) * 4096
        client.shutdown()

        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"vdisk:{os.urandom(32).hex()}\n")
        intruder = nbd.NBD()
        intruder.set_tls(nbd.TLS_REQUIRE)
        intruder.set_tls_username("vdisk")
        intruder.set_tls_psk_file(str(wrong))
        with pytest.raises(nbd.Error):
            intruder.connect_tcp("127.0.0.1", str(port))
            intruder.pread(512, 0)

        qemu_dir = tmp_path / "qemu-psk"
        qemu_dir.mkdir()
        (qemu_dir / "keys.psk").write_text(f"vdisk:{key}\n")
        out = run("qemu-io", "--object", f"tls-creds-psk,id=tls0,dir={qemu_dir},endpoint=client,username=vdisk",
                  "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                  "tls-creds=tls0", "-c", "read -P 0xa1 0 4k").stdout
        assert "read 4096/4096" in out, out
    finally:
        _stop(proc)


def test_tls_without_credentials_is_refused_with_one_line(chain4):
    proc = subprocess.run([*VDISK, "serve", str(chain4["D"]), "--bind", "127.0.0.1", "--port",
                           str(_free_port()), "--tls", "require"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "needs --tls-creds" in proc.stderr and "Traceback" not in proc.stderr


def test_backing_files_outside_the_allowed_directories_are_refused(chain4, tmp_path):
    proc = subprocess.run([*VDISK, "serve", str(chain4["D"]), "--socket", str(tmp_path / "s.sock"),
                           "--allow-backing-dir", str(tmp_path / "elsewhere")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "outside the allowed directories" in proc.stderr and "Traceback" not in proc.stderr
