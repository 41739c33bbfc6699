"""TLS termination settings for a listener.

A listener that terminates TLS hands Twisted's ``listenSSL`` the object built by
:func:`server_context_factory`.  The policy lives here, in one place, so that
every listener gets the same choices: TLS 1.2 or newer, forward-secret AEAD
ciphers only for TLS 1.2 (OpenSSL's defaults for TLS 1.3), no compression, no
renegotiation, and ALPN that picks the protocol module's protocol (its
``ProtocolModule.alpn``; HTTP: ``http/1.1``).

Several certificates can share a listener.  Each one gets its own OpenSSL
context, built once at startup, and the SNI name the client sends picks which
one answers; clients that send no name, or a name we do not hold, get the
first certificate.  Every file is read and checked while building, so a bad
path or a key that does not belong to its certificate stops the server at
startup with a message naming the file, rather than failing at the first
handshake.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with an AEAD cipher.
# TLS 1.3 suites are configured separately by OpenSSL and are left at defaults.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

# Lets resumed sessions be accepted whichever certificate context is in use.
_SESSION_ID = b"afpa"


@attrs.frozen
class Certificate:
    """One certificate for a TLS listener.

    ``cert`` is a PEM file with the leaf certificate first, optionally followed
    by its intermediates; ``key`` is the PEM private key for the leaf.
    """

    cert: str
    key: str


def server_names(cert_path: str) -> list[str]:
    """Return the lowercase DNS names a PEM certificate is valid for.

    Names come from the subjectAltName DNS entries; the subject common name is
    used only when the certificate has no DNS names there (older certificates).
    Wildcards such as ``*.example.com`` are returned as written.  Raises
    ``ValueError`` naming the file if it cannot be read or parsed.
    """
    leaf = _load_leaf(cert_path)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            attr.value
            for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(attr.value, str)
        ]
    out: list[str] = []
    for name in names:
        name = name.strip().rstrip(".").lower()
        if name and name not in out:
            out.append(name)
    return out


def server_context_factory(certs: list[Certificate], alpn: tuple[bytes, ...] = ()) -> object:
    """Build the ``contextFactory`` for ``reactor.listenSSL`` from ``certs``.

    The first certificate is the default.  ``alpn``: the application protocols
    the module speaks, most preferred first (empty: no ALPN answer; the client
    carries on without).  Raises ``ValueError`` if ``certs``
    is empty or any file is missing, unreadable, not PEM, or if a key does not
    match its certificate.
    """
    if not certs:
        raise ValueError("a TLS listener needs at least one certificate")
    entries = [(server_names(c.cert), _build_context(c, tuple(alpn))) for c in certs]
    selector = _NameSelector(entries)
    # The servername callback only runs on the context a connection starts
    # with, which is always the default one.
    default = entries[0][1]
    default.set_tlsext_servername_callback(selector.on_servername)
    return _ServerContextFactory(default)


# Declaring the interface keeps Twisted from warning that this is a legacy,
# undeclared context factory.
@implementer(IOpenSSLContextFactory)
class _ServerContextFactory:
    """What ``listenSSL`` wants: an object with ``getContext()``."""

    def __init__(self, context: SSL.Context):
        self._context = context

    def getContext(self) -> SSL.Context:
        """Return the default context; SNI may switch a connection away from it."""
        return self._context

    def replace(self, other: _ServerContextFactory) -> None:
        """Answer new handshakes with ``other``'s certificates (a reload that
        re-read them).  Twisted asks ``getContext`` once per accepted connection,
        so the listeners stay open and connections already set up keep theirs."""
        self._context = other._context


class _NameSelector:
    """Maps an SNI name to the context of the certificate that covers it."""

    def __init__(self, entries: list[tuple[list[str], SSL.Context]]):
        # Exact names win over wildcards; within each kind the first
        # certificate listed wins, so operators control ties by ordering.
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        for names, ctx in entries:
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], ctx)
                else:
                    self._exact.setdefault(name, ctx)

    def context_for(self, name: str) -> SSL.Context | None:
        """Return the context for ``name``, or None to keep the default."""
        name = name.rstrip(".").lower()
        ctx = self._exact.get(name)
        if ctx is not None:
            return ctx
        # A wildcard stands for exactly one leftmost label.
        label, dot, parent = name.partition(".")
        if label and dot:
            return self._wildcard.get(parent)
        return None

    def on_servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            return  # not a valid host name; the default certificate answers
        ctx = self.context_for(name)
        if ctx is not None and ctx is not connection.get_context():
            connection.set_context(ctx)


def _alpn_selector(ours: tuple[bytes, ...]) -> Any:
    """The ALPN callback choosing our most preferred protocol the client offers."""
    def select(connection: SSL.Connection, offered: list[bytes]) -> object:
        for proto in ours:
            if proto in offered:
                return proto
        # Declining (rather than an empty answer, which aborts the handshake)
        # lets e.g. an h2-only client carry on without ALPN and learn from the
        # protocol itself what we speak.
        return SSL.NO_OVERLAPPING_PROTOCOLS
    return select


def _read_pem(path: str, what: str) -> bytes:
    """The bytes of a TLS file, or ValueError ``<path>: <what>: <problem>`` (one line)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        problem = "is a directory, not a PEM file"
    except FileNotFoundError:
        problem = "no such file"
    except PermissionError:
        problem = "permission denied (afpa must be able to read it)"
    except OSError as e:
        problem = f"cannot read: {e.strerror or e}"
    raise ValueError(f"{path}: {what}: {problem}")


def _build_context(cert: Certificate, alpn: tuple[bytes, ...]) -> SSL.Context:
    # Read both files first so every mistake is reported by what it is (a
    # directory, missing, unreadable) before OpenSSL sees them.
    for path, what in ((cert.cert, "TLS certificate"), (cert.key, "TLS private key")):
        _read_pem(path, what)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: {what}: not a regular file")

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    # Older pyOpenSSL builds do not expose this flag.
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    ctx.set_options(options)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_session_id(_SESSION_ID)
    if alpn:
        # Set on every context: after an SNI switch OpenSSL asks the new one.
        ctx.set_alpn_select_callback(_alpn_selector(alpn))

    try:
        ctx.use_certificate_chain_file(cert.cert)
    except (SSL.Error, OSError) as e:
        raise ValueError(f"{cert.cert}: TLS certificate: cannot load: {_reason(e)}") from e
    _check_key(cert.key)
    try:
        # OpenSSL compares the key with the certificate already loaded, so a
        # key that parsed above can only fail here by not matching it.
        ctx.use_privatekey_file(cert.key)
        ctx.check_privatekey()
    except (SSL.Error, OSError) as e:
        raise ValueError(
            f"{cert.key}: TLS private key does not match the certificate {cert.cert} ({_reason(e)})"
        ) from e
    return ctx


def _check_key(path: str) -> None:
    # Parse the key ourselves first: OpenSSL would stop and prompt on the
    # terminal for a passphrase if the key is encrypted, and its parse errors
    # do not say much.
    data = _read_pem(path, "TLS private key")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise ValueError(
            f"{path}: TLS private key is encrypted; a passphrase-free key is required"
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"{path}: TLS private key: not a PEM private key") from e


def _load_leaf(path: str) -> x509.Certificate:
    data = _read_pem(path, "TLS certificate")
    try:
        # The first certificate in a chain file is the leaf.
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError as e:
        raise ValueError(f"{path}: TLS certificate: not a PEM certificate") from e


def _reason(error: Exception) -> str:
    # pyOpenSSL errors carry a list of (library, function, reason) tuples.
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(error) or type(error).__name__
