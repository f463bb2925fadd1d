"""Who is calling: bearer tokens from a tokens file, or the client certificate (mTLS).

The tokens file (TOML) holds only SHA-256 hashes of the tokens::

    [[tokens]]
    sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    principal = "alice"
    roles = ["admin"]                 # optional; the admin role sees every job
    types = ["echo", "countdown"]     # optional; the job types alice may submit
    expires = 2027-01-01T00:00:00Z    # optional

    [[certificates]]                  # mutual TLS: a client certificate, mapped explicitly
    subject = "CN=build-bot,O=Acme"   # its subject (RFC 4514, as gRPC reports it), or
    # san = "build-bot.clients.example.com"   # one of its subject alternative names
    principal = "build-bot"           # must not be the name of a token's principal
    roles = []
    types = ["echo"]

``ajs token new PRINCIPAL`` makes a token and prints its entry. A call carries
``authorization: Bearer <token>``. With mutual TLS and no token, the client
certificate names the caller: through a ``[[certificates]]`` entry when a tokens
file is configured (an unmapped certificate is refused), else as the principal
``x509:<subject>`` (a name no token principal can have). Health and reflection
need no credentials.

Each principal has its own namespace of request ids (see :meth:`Principal.qualify`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from ajs_grpc.core.errors import ConfigError, FieldViolation, InvalidArgument, PermissionDenied, Unauthenticated

__all__ = [
    "ANONYMOUS",
    "Authenticator",
    "PeerCertificate",
    "PermissionDenied",
    "Principal",
    "Unauthenticated",
    "new_token",
]

# Principal names of the tokens file: no "/" or "~", which delimit id namespaces.
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
# Marks a request id that names its namespace: "~alice/x" (alice's x), "~/x" (an admin's x).
NAMESPACE_MARK = "~"


@dataclasses.dataclass(frozen=True)
class Principal:
    """A caller.

    Attributes:
        name: who it is; becomes ``Request.creator``.
        roles: its roles.
        types: the job types it may submit; None for any.
        admin: it may see and cancel every job.
    """

    name: str
    roles: frozenset[str] = frozenset()
    types: frozenset[str] | None = None
    admin: bool = False

    def qualify(self, request_id: str) -> str:
        """The stored id of the request this principal calls ``request_id``.

        Each principal names requests in a namespace of its own, so an id one
        principal took never blocks another: alice's ``x`` is stored as
        ``~alice/x``. Admins name stored ids as they are (and submit into the
        shared namespace). Anyone may give a full name: ``~alice/x``, or ``~/x``
        for the shared namespace's ``x``.
        """
        if not request_id:
            return request_id
        if request_id.startswith(NAMESPACE_MARK):
            return request_id[2:] if request_id.startswith(NAMESPACE_MARK + "/") else request_id
        return request_id if self.admin else f"{NAMESPACE_MARK}{self.name}/{request_id}"

    def unqualify(self, stored_id: str) -> str:
        """The name this principal knows a stored id by (the inverse of :meth:`qualify`)."""
        if self.admin or not stored_id:
            return stored_id
        own = f"{NAMESPACE_MARK}{self.name}/"
        if stored_id.startswith(own):
            return stored_id[len(own) :]
        return stored_id if stored_id.startswith(NAMESPACE_MARK) else f"{NAMESPACE_MARK}/{stored_id}"

    def owns_name(self, stored_id: str) -> bool:
        """True when ``stored_id`` lies in this principal's own namespace (admins: the shared one)."""
        if self.admin:
            return not stored_id.startswith(NAMESPACE_MARK)
        return stored_id.startswith(f"{NAMESPACE_MARK}{self.name}/")


@dataclasses.dataclass(frozen=True)
class PeerCertificate:
    """The verified client certificate of a call (mutual TLS), as gRPC reports it.

    Attributes:
        subject: its subject, e.g. ``CN=alice,O=Acme``.
        alternative_names: its subject alternative names (DNS names, URIs, emails, addresses).
    """

    subject: str
    alternative_names: tuple[str, ...] = ()

    @property
    def principal_name(self) -> str:
        """The principal of an unmapped certificate: ``x509:<subject>``, namespace delimiters escaped."""
        escaped = self.subject.replace("%", "%25").replace("/", "%2F").replace(NAMESPACE_MARK, "%7E")
        return f"x509:{escaped}"


ANONYMOUS = Principal("anonymous", admin=True)
"""The caller when authentication is off: it may do everything."""


@dataclasses.dataclass(frozen=True)
class _Token:
    principal: Principal
    expires: datetime | None


def token_hash(token: str) -> str:
    """The hex SHA-256 of ``token``, as the tokens file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(principal: str, roles: Iterable[str] = ()) -> tuple[str, str]:
    """A fresh random token and its tokens-file entry.

    Raises:
        InvalidArgument: the principal's name is one the tokens file refuses.
    """
    if not PRINCIPAL_NAME.fullmatch(principal):
        description = "must be 1-64 letters, digits and ._@+- (starting with a letter or digit)"
        raise InvalidArgument(f"principal {principal!r} {description}", [FieldViolation("principal", description)])
    token = secrets.token_urlsafe(32)
    role_list = ", ".join(json.dumps(role) for role in roles)  # a JSON string is a TOML basic string
    entry = f'[[tokens]]\nsha256 = "{token_hash(token)}"\nprincipal = "{principal}"\nroles = [{role_list}]\n'
    return token, entry


@dataclasses.dataclass(frozen=True)
class _CertificateMapping:
    subject: str | None
    san: str | None
    principal: Principal

    def matches(self, certificate: PeerCertificate) -> bool:
        if self.subject is not None:
            return hmac.compare_digest(self.subject.encode(), certificate.subject.encode())
        return self.san in certificate.alternative_names


def _listed(entry: Mapping[str, object], key: str, where: str) -> list[str] | None:
    listed = entry.get(key)
    if listed is None:
        return None
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise ConfigError(f"{where}: {key} must be a list of strings", reason="BAD_TOKENS_FILE")
    return listed


def _principal(entry: Mapping[str, object], where: str, admin_role: str) -> Principal:
    name = entry.get("principal")
    if not isinstance(name, str) or not PRINCIPAL_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: principal must be 1-64 letters, digits and ._@+- (starting with a letter or digit)",
            reason="BAD_TOKENS_FILE",
        )
    roles = frozenset(_listed(entry, "roles", where) or [])
    types = _listed(entry, "types", where)
    return Principal(name, roles, frozenset(types) if types is not None else None, admin_role in roles)


class Authenticator:
    """Maps a call's credentials to a :class:`Principal`.

    Args:
        tokens: token hash -> principal and expiry.
        admin_role: the role that makes a principal an admin.
        client_certificates: mutual TLS is on, so a certificate may identify a caller.
        certificates: explicit certificate mappings; when there are tokens or
            mappings, an unmapped certificate is refused.
    """

    def __init__(
        self,
        tokens: Mapping[str, _Token],
        admin_role: str = "admin",
        client_certificates: bool = False,
        certificates: Iterable[_CertificateMapping] = (),
    ):
        self._tokens = dict(tokens)
        self.admin_role = admin_role
        self.client_certificates = client_certificates
        self._certificates = list(certificates)

    @classmethod
    def from_file(cls, path: Path, admin_role: str = "admin", client_certificates: bool = False) -> Authenticator:
        """Reads a tokens file.

        Raises:
            ConfigError: the file is missing or malformed (the entry is named).
        """
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"tokens file {path} does not exist", reason="NO_TOKENS_FILE") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"tokens file {path}: not valid TOML: {error}", reason="BAD_TOKENS_FILE") from None
        unknown_tables = set(document) - {"tokens", "certificates"}
        if unknown_tables:
            raise ConfigError(
                f"tokens file {path}: unknown table {sorted(unknown_tables)[0]}", reason="BAD_TOKENS_FILE"
            )
        tokens: dict[str, _Token] = {}
        for number, entry in enumerate(document.get("tokens", []), 1):
            where = f"tokens file {path}, token #{number}"
            digest = entry.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64:
                raise ConfigError(f"{where}: needs sha256 (64 hex digits) and principal", reason="BAD_TOKENS_FILE")
            unknown = set(entry) - {"sha256", "principal", "roles", "types", "expires"}
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]}", reason="BAD_TOKENS_FILE")
            principal = _principal(entry, where, admin_role)
            expires = entry.get("expires")
            if expires is not None and not isinstance(expires, datetime):
                raise ConfigError(f"{where}: expires must be a TOML date-time", reason="BAD_TOKENS_FILE")
            if isinstance(expires, datetime) and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            tokens[digest.lower()] = _Token(principal, expires)
        token_names = {token.principal.name for token in tokens.values()}
        certificates: list[_CertificateMapping] = []
        for number, entry in enumerate(document.get("certificates", []), 1):
            where = f"tokens file {path}, certificate #{number}"
            unknown = set(entry) - {"subject", "san", "principal", "roles", "types"}
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]}", reason="BAD_TOKENS_FILE")
            subject, san = entry.get("subject"), entry.get("san")
            if (subject is None) == (san is None) or not isinstance(subject or san, str) or not (subject or san):
                raise ConfigError(f"{where}: needs one of subject or san (a string)", reason="BAD_TOKENS_FILE")
            principal = _principal(entry, where, admin_role)
            if principal.name in token_names:
                raise ConfigError(
                    f"{where}: principal {principal.name!r} is a token's principal too; "
                    "a certificate must name a principal of its own",
                    reason="BAD_TOKENS_FILE",
                )
            certificates.append(_CertificateMapping(subject, san, principal))
        return cls(tokens, admin_role, client_certificates, certificates)

    def authenticate(self, metadata: Mapping[str, str], certificate: PeerCertificate | None) -> Principal:
        """The principal of a call, from its ``authorization`` metadata or its client certificate.

        Raises:
            Unauthenticated: no credentials, a malformed header, an unknown or expired
                token, an unmapped certificate.
        """
        header = metadata.get("authorization")
        if header is None:
            if self.client_certificates and certificate is not None:
                return self._certificate_principal(certificate)
            raise Unauthenticated("this call needs a bearer token (authorization: Bearer <token>)", reason="NO_TOKEN")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header must be 'Bearer <token>'", reason="MALFORMED_TOKEN")
        digest = token_hash(token.strip())
        found = next((t for h, t in self._tokens.items() if hmac.compare_digest(h, digest)), None)
        if found is None:
            raise Unauthenticated("unknown token", reason="UNKNOWN_TOKEN")
        if found.expires is not None and found.expires <= datetime.now(UTC):
            raise Unauthenticated("the token has expired", reason="EXPIRED_TOKEN")
        return found.principal

    def _certificate_principal(self, certificate: PeerCertificate) -> Principal:
        for mapping in self._certificates:
            if mapping.matches(certificate):
                return mapping.principal
        if self._tokens or self._certificates:
            raise Unauthenticated(
                "the client certificate is not mapped to a principal ([[certificates]] in the tokens file)",
                reason="UNKNOWN_CERTIFICATE",
            )
        # Mutual TLS alone: the CA vouches for each certificate, a principal of its own.
        return Principal(certificate.principal_name)
