"""Who may use the server, and whose conversations a request reaches.

Without keys the server has one user, the local one, and conversation names are theirs. With
keys (``--api-key``, repeatable, or ``--api-keys-file``) every request needs one, and the names a
key's requests use live in that key's own namespace: one client can neither read, continue nor
delete another's conversations, even knowing their names.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from .api_errors import ApiError

LOCAL = ""  # the namespace of a server without keys: the sessions folder itself


class Access:
    """The API keys a server accepts (none: open to the local user) and the namespace of each."""

    def __init__(self, keys: list[str] | tuple[str, ...] = ()):
        for key in keys:
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and hold no whitespace")
        self._keys = [key.encode() for key in dict.fromkeys(keys)]

    @classmethod
    def from_options(cls, keys: tuple[str, ...], keys_file: Path | None) -> "Access":
        """Keys given on the command line (or EDGESINK_API_KEY) plus those of a file: one per line,
        blank lines and lines starting with '#' ignored. A file keeps keys out of ``ps``."""
        found = list(keys)
        if keys_file is not None:
            for line in Path(keys_file).read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append(line.strip())
            if len(found) == len(keys):
                raise ValueError(f"the keys file {keys_file.name} holds no key")
        return cls(found)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def namespace(self, authorization: str | None) -> str:
        """The namespace of a request with this ``Authorization`` header; a 401 without a valid key.

        The scheme is matched case-insensitively (RFC 9110); every key is compared, in constant time,
        so the time taken says nothing of which key came close."""
        if not self._keys:
            return LOCAL
        scheme, _, given = (authorization or "").strip().partition(" ")
        given = given.strip().encode()
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                           kind="authentication_error", code="invalid_api_key")
        return namespace_of(self._keys[matches.index(True)])


def namespace_of(key: bytes) -> str:
    """A key's namespace: a folder name derived from the key, which never stores the key itself."""
    return "key-" + hashlib.sha256(b"edgesink namespace\0" + key).hexdigest()[:24]
