"""TLS listener settings: certificate names, load errors, and real handshakes.

Certificates are generated per test.  Handshakes run the server side with
pyOpenSSL over memory BIOs in a thread and the client with the stdlib ``ssl``
module on the other end of a socketpair, so no reactor or network address is
involved and every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory

from afpa.net.tls import Certificate, server_context_factory, server_names

TIMEOUT = 5.0


def _make_cert(tmp_path, stem, cn, sans=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    cert_path = tmp_path / f"{stem}.crt"
    key_path = tmp_path / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert=str(cert_path), key=str(key_path)), cert


@pytest.fixture
def certs(tmp_path):
    a, a_x509 = _make_cert(tmp_path, "a", "a.test", ["a.test", "www.a.test"])
    b, b_x509 = _make_cert(tmp_path, "b", "b wildcard", ["*.b.test"])
    return {"a": a, "b": b, "a_x509": a_x509, "b_x509": b_x509}


@pytest.fixture
def factory(certs):
    return server_context_factory([certs["a"], certs["b"]], (b"http/1.1",))


# -- names -------------------------------------------------------------------


def test_names_come_from_subject_alt_names(certs):
    assert server_names(certs["a"].cert) == ["a.test", "www.a.test"]
    assert server_names(certs["b"].cert) == ["*.b.test"]


def test_common_name_is_the_fallback_and_names_are_lowercased(tmp_path):
    c, _ = _make_cert(tmp_path, "old", "Legacy.Example.TEST")
    assert server_names(c.cert) == ["legacy.example.test"]


def test_names_of_non_pem_file(tmp_path):
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="junk.crt"):
        server_names(str(junk))


# -- load errors ---------------------------------------------------------------


def test_mismatched_key_names_the_files(certs):
    wrong = Certificate(cert=certs["a"].cert, key=certs["b"].key)
    with pytest.raises(ValueError, match="does not match") as info:
        server_context_factory([wrong])
    assert certs["b"].key in str(info.value)
    assert certs["a"].cert in str(info.value)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_missing_file(certs, tmp_path, which):
    missing = str(tmp_path / "nowhere.pem")
    bad = Certificate(cert=missing, key=certs["a"].key) if which == "cert" else Certificate(
        cert=certs["a"].cert, key=missing
    )
    with pytest.raises(ValueError, match="nowhere.pem"):
        server_context_factory([certs["b"], bad])


def test_non_pem_files(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\x01 definitely not PEM")
    with pytest.raises(ValueError, match="junk.pem"):
        server_context_factory([Certificate(cert=str(junk), key=certs["a"].key)])
    with pytest.raises(ValueError, match="junk.pem"):
        server_context_factory([Certificate(cert=certs["a"].cert, key=str(junk))])


def test_encrypted_key_is_refused_without_prompting(certs, tmp_path):
    key = serialization.load_pem_private_key(Path(certs["a"].key).read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="locked.key.*encrypted"):
        server_context_factory([Certificate(cert=certs["a"].cert, key=str(locked))])


def test_no_certificates():
    with pytest.raises(ValueError):
        server_context_factory([])


def test_context_is_built_once(factory):
    # Declared, so Twisted's listenSSL accepts it without a legacy warning.
    assert IOpenSSLContextFactory.providedBy(factory)
    assert isinstance(factory.getContext(), SSL.Context)
    assert factory.getContext() is factory.getContext()


# -- handshakes ------------------------------------------------------------------


class _Server(threading.Thread):
    """Runs one server handshake with pyOpenSSL over memory BIOs."""

    def __init__(self, context, sock):
        super().__init__(daemon=True)
        self.conn = SSL.Connection(context, None)
        self.conn.set_accept_state()
        self.sock = sock
        self.error: Exception | None = None
        self.alpn: bytes | None = None
        self.version: str | None = None

    def _flush(self):
        while True:
            try:
                data = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            self.sock.sendall(data)

    def run(self):
        try:
            while True:
                try:
                    self.conn.do_handshake()
                    break
                except SSL.WantReadError:
                    self._flush()
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionError("client went away during the handshake")
                    self.conn.bio_write(data)
            # The client waits for this, so it cannot hang up while we still
            # have handshake bytes (TLS 1.3 session tickets) to send.
            self.conn.send(b"ok")
            self._flush()
            self.alpn = self.conn.get_alpn_proto_negotiated() or None
            self.version = self.conn.get_protocol_version_name()
        except Exception as e:  # reported to the test through self.error
            self.error = e
            try:
                self._flush()  # deliver the alert so the client fails promptly
            except Exception:
                pass
        finally:
            self.sock.close()


def _handshake(factory, client_ctx, server_hostname=None):
    """Handshake once; return (server thread, client result dict or exception)."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(TIMEOUT)
    client_sock.settimeout(TIMEOUT)
    server = _Server(factory.getContext(), server_sock)
    server.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            result = {
                "cert": x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)),
                "alpn": tls.selected_alpn_protocol(),
                "version": tls.version(),
                "cipher": tls.cipher()[0],
                "data": tls.recv(2),
            }
    except (ssl.SSLError, OSError) as e:
        result = e
    finally:
        client_sock.close()
        server.join(TIMEOUT)
    assert not server.is_alive(), "server handshake thread did not finish"
    return server, result


def _client(alpn=("h2", "http/1.1")):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def test_sni_wildcard_picks_matching_certificate_and_http11(factory, certs):
    server, result = _handshake(factory, _client(), "x.b.test")
    assert server.error is None
    assert result["data"] == b"ok"
    assert result["cert"] == certs["b_x509"]
    assert result["alpn"] == "http/1.1"
    assert server.alpn == b"http/1.1"
    assert result["version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    "hostname", [None, "nomatch.test", "b.test", "deep.x.b.test"], ids=str
)
def test_no_sni_or_no_match_gets_first_certificate(factory, certs, hostname):
    server, result = _handshake(factory, _client(), hostname)
    assert server.error is None
    assert result["cert"] == certs["a_x509"]
    assert result["alpn"] == "http/1.1"


def test_exact_name_is_case_insensitive(certs):
    # b is first (the default), so picking a proves the SNI lookup worked.
    factory = server_context_factory([certs["b"], certs["a"]])
    server, result = _handshake(factory, _client(), "WWW.A.Test")
    assert server.error is None
    assert result["cert"] == certs["a_x509"]


def test_client_offering_only_h2_continues_without_alpn(factory, certs):
    server, result = _handshake(factory, _client(alpn=("h2",)), "x.b.test")
    assert server.error is None
    assert result["cert"] == certs["b_x509"]
    assert result["alpn"] is None
    assert server.alpn is None


def test_client_offering_no_alpn(factory):
    server, result = _handshake(factory, _client(alpn=None), "a.test")
    assert server.error is None
    assert result["alpn"] is None


def test_alpn_offers_what_the_module_speaks(certs):
    # The list is the protocol module's (ProtocolModule.alpn), most preferred first.
    other = server_context_factory([certs["a"]], (b"dot", b"x-line"))
    server, result = _handshake(other, _client(alpn=("http/1.1", "x-line", "dot")), "a.test")
    assert server.error is None and result["alpn"] == "dot"
    silent = server_context_factory([certs["a"]], ())  # a module without ALPN answers none
    server, result = _handshake(silent, _client(), "a.test")
    assert server.error is None and result["alpn"] is None


def test_the_http_module_declares_http11():
    from protocols.http.module import MODULE
    assert MODULE.alpn == (b"http/1.1",)


def test_tls12_client_gets_an_ecdhe_aead_cipher(factory):
    ctx = _client()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, result = _handshake(factory, ctx, "a.test")
    assert server.error is None
    assert result["version"] == "TLSv1.2"
    name = result["cipher"]
    assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls11_client_is_refused(factory):
    ctx = _client()
    # Let the client really offer old versions, so it is the server refusing.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    server, result = _handshake(factory, ctx, "a.test")
    assert isinstance(result, Exception)
    assert isinstance(server.error, SSL.Error)
    assert "unsupported protocol" in str(server.error)


def test_tls12_client_without_forward_secrecy_is_refused(factory):
    ctx = _client()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-GCM-SHA256:AES256-SHA")
    server, result = _handshake(factory, ctx, "a.test")
    assert isinstance(result, Exception)
    assert isinstance(server.error, SSL.Error)
    assert "no shared cipher" in str(server.error)
