"""Who is calling: bearer tokens from a tokens file, or the client certificate (mTLS).

The tokens file (TOML) holds only SHA-256 hashes of the tokens::

    [[tokens]]
    sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    principal = "alice"
    roles = ["admin"]                 # optional; the admin role sees every job
    types = ["echo", "countdown"]     # optional; the job types alice may submit
    expires = 2027-01-01T00:00:00Z    # optional

``ajs token new PRINCIPAL`` makes a token and prints its entry. A call carries
``authorization: Bearer <token>``; with mutual TLS and no token, the principal is
the client certificate's common name (without roles). Health and reflection need
no credentials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from ajs_grpc.config import ConfigError
from ajs_grpc.errors import PermissionDenied, Unauthenticated

__all__ = ["ANONYMOUS", "Authenticator", "PermissionDenied", "Principal", "Unauthenticated", "new_token"]


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
    """A fresh random token and its tokens-file entry."""
    token = secrets.token_urlsafe(32)
    role_list = ", ".join(f'"{role}"' for role in roles)
    entry = f'[[tokens]]\nsha256 = "{token_hash(token)}"\nprincipal = "{principal}"\nroles = [{role_list}]\n'
    return token, entry


class Authenticator:
    """Maps a call's credentials to a :class:`Principal`.

    Args:
        tokens: token hash -> principal and expiry.
        admin_role: the role that makes a principal an admin.
        client_certificates: mutual TLS is on, so a certificate may identify a caller.
    """

    def __init__(self, tokens: Mapping[str, _Token], admin_role: str = "admin", client_certificates: bool = False):
        self._tokens = dict(tokens)
        self.admin_role = admin_role
        self.client_certificates = client_certificates

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
        tokens: dict[str, _Token] = {}
        for number, entry in enumerate(document.get("tokens", []), 1):
            where = f"tokens file {path}, token #{number}"
            digest, name = entry.get("sha256"), entry.get("principal")
            if not isinstance(digest, str) or len(digest) != 64 or not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: needs sha256 (64 hex digits) and principal", reason="BAD_TOKENS_FILE")
            unknown = set(entry) - {"sha256", "principal", "roles", "types", "expires"}
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]}", reason="BAD_TOKENS_FILE")
            for key in ("roles", "types"):
                listed = entry.get(key, [])
                if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
                    raise ConfigError(f"{where}: {key} must be a list of strings", reason="BAD_TOKENS_FILE")
            roles = frozenset(entry.get("roles", []))
            types = entry.get("types")
            expires = entry.get("expires")
            if expires is not None and not isinstance(expires, datetime):
                raise ConfigError(f"{where}: expires must be a TOML date-time", reason="BAD_TOKENS_FILE")
            if isinstance(expires, datetime) and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            principal = Principal(name, roles, frozenset(types) if types is not None else None, admin_role in roles)
            tokens[digest.lower()] = _Token(principal, expires)
        return cls(tokens, admin_role, client_certificates)

    def authenticate(self, metadata: Mapping[str, str], peer_common_name: str | None) -> Principal:
        """The principal of a call, from its ``authorization`` metadata or its client certificate.

        Raises:
            Unauthenticated: no credentials, a malformed header, an unknown or expired token.
        """
        header = metadata.get("authorization")
        if header is None:
            if self.client_certificates and peer_common_name:
                return Principal(peer_common_name)
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
