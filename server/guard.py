"""The rules a local service on a developer's machine follows (as Jupyter's and Gradio's servers do), as one ASGI
middleware in front of the app:

- **allowed hosts**: a request whose Host header names another host is refused (403), so a web page cannot reach
  the server through a DNS name rebound to 127.0.0.1 and read what it answers;
- **no cross-site compute**: a request a browser marks as coming from another site (`Sec-Fetch-Site:
  cross-site` or `same-site`, or an `Origin` that is not this server) is refused (403), so a page the user visits
  cannot start generations (`<img src=".../api/generate?...">`) or post to the API;
- **a token** when one is set (required when the server listens beyond this machine): `Authorization: Bearer T`,
  `?token=T` (which also sets a cookie, so the page's own requests carry it) or that cookie;
- **bounded bodies**: a body longer than `max_body` bytes is refused (413) from its Content-Length before it is
  read; a body without one is refused (411).

Every refusal is one line of JSON, `{"detail": "..."}`, with no path and no traceback.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
from http.cookies import SimpleCookie
from typing import Iterable, Optional
from urllib.parse import parse_qs, urlsplit

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "t2i_token"
CROSS_SITE = ("cross-site", "same-site")


def is_local(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host of a Host header or of an Origin's netloc, without its port ("[::1]:7860" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Refused(Exception):
    def __init__(self, status: int, detail: str, headers: Optional[dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


async def respond(send, status: int, detail: str, headers: Optional[dict[str, str]] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class LocalService:
    """ASGI middleware: allowed hosts, same-site requests only, an optional token, bounded request bodies."""

    def __init__(self, app, allowed_hosts: Iterable[str], token: Optional[str] = None, max_body: int = 8 << 20):
        self.app, self.token, self.max_body = app, token, max_body
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.any_host = "*" in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check(scope, headers)
        except Refused as e:
            return await respond(send, e.status, e.detail, e.headers)
        if not self.token_in_query(scope) or self.token is None:
            return await self.app(scope, receive, send)

        async def with_cookie(message):  # ?token=T: the page's own later requests carry it as a cookie
            if message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return await self.app(scope, receive, with_cookie)

    def check(self, scope, headers: dict[str, str]) -> None:
        host = host_name(headers.get("host", ""))
        if not self.any_host and host not in self.allowed:
            raise Refused(403, f"host {host!r} is not allowed (t2i serve --allow-host adds one)")
        if headers.get("sec-fetch-site") in CROSS_SITE:
            raise Refused(403, "requests from another site are refused")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            raise Refused(403, "requests from another origin are refused")
        if self.token is not None and not self.authorized(scope, headers):
            raise Refused(401, "this server needs its token: open the address t2i serve printed (?token=...), or "
                               "send Authorization: Bearer TOKEN")
        length = headers.get("content-length")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            raise Refused(411, "send the body with a Content-Length")  # so its size is known before it is read
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise Refused(413, f"the request body is larger than this server takes ({self.max_body >> 20} MiB)")

    def token_in_query(self, scope) -> Optional[str]:
        return (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [None])[0]

    def authorized(self, scope, headers: dict[str, str]) -> bool:
        given = [self.token_in_query(scope)]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        cookie = SimpleCookie(headers.get("cookie", ""))
        if TOKEN_COOKIE in cookie:
            given.append(cookie[TOKEN_COOKIE].value)
        return any(g is not None and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)


PATH = re.compile(r"(?<![\w.\]])(?:[A-Za-z]:)?[/\\](?:[^\s'\"(),;:]+[/\\])+([^\s'\"(),;:]*)")


def public(message: str, names: Optional[dict[str, str]] = None) -> str:
    """A message fit for a web client: a pipeline's folder said by the name it is served under, and any other
    absolute path cut to its last part (the server's file layout is nobody else's business)."""
    for folder, name in sorted((names or {}).items(), key=lambda kv: -len(kv[0])):
        message = message.replace(folder, f"[{name}]")
    return PATH.sub(lambda m: m.group(1) or "[folder]", message)
