"""Refusing what a web page could send: requests for other hosts, foreign origins, non-JSON posts.

A server on 127.0.0.1 is still reachable from every page the user's browser opens. A page can
POST a "simple" request (``Content-Type: text/plain``, no preflight) to it, and through DNS
rebinding (a name of the attacker's that first resolves to the attacker, then to 127.0.0.1) it
can read the answers too. Local LLM servers have been attacked both ways. So: the Host header must
name this server, a POST must be ``application/json`` (which no page can send cross-site without a
CORS preflight), and a browser's foreign ``Origin`` is refused unless it was allowed; allowed
origins get proper CORS (Starlette's middleware), preflight included.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from .api_errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
CORS_HEADERS = ["authorization", "content-type", "x-edgesink-session"]
EXPOSED_HEADERS = ["x-edgesink-session", "x-edgesink-started-over", "retry-after"]


def host_name(host: str) -> str:
    """The name part of a Host header (``[::1]:8080`` -> ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware in front of the app: Host, Origin and Content-Type checks, then CORS.

    Args:
        app: the app it guards.
        bind: the address the server listens on; its name is an allowed Host too.
        allowed_hosts: more names a Host header may give (``--allow-host``); ``*`` allows any.
        cors_origins: origins (``https://app.example:3000``) whose pages may call the server;
            ``*`` allows every origin (only sensible with API keys).
    """

    def __init__(self, app, *, bind: str, allowed_hosts=(), cors_origins=()):
        self.hosts = {n.lower() for n in (*LOOPBACK_NAMES, *allowed_hosts)}
        if bind not in WILDCARD_BINDS:
            self.hosts.add(host_name(bind))
        self.origins = {o.rstrip("/").lower() for o in cors_origins}
        self.app = CORSMiddleware(app, allow_origins=sorted(self.origins), allow_methods=["GET", "POST", "DELETE"],
                                  allow_headers=CORS_HEADERS, expose_headers=EXPOSED_HEADERS, max_age=600)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope) -> ApiError | None:
        """Why this request is refused, or None."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return ApiError(403, f"the Host header {host!r} does not name this server (a DNS-rebinding "
                                 "page would send its own name); start it with --allow-host NAME to accept it",
                            kind="permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return ApiError(403, f"requests from the web origin {origin!r} are refused; start the server with "
                                 "--cors-origin ORIGIN to let that origin's pages use it",
                            kind="permission_error", code="origin_not_allowed")
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                return ApiError(415, f"a POST body must be sent as Content-Type: application/json, not "
                                     f"{media_type or 'nothing'!r}", code="unsupported_media_type")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        # The server's own origin (a page it served, were there one): same scheme-less host and port.
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()
