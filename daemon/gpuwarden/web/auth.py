"""Who may use the dashboard, and which requests may act.

- One random token, written to the state dir (0640, the socket group if set) and printed by
  `gpuwarden dashboard`, is needed for every request: as `Authorization: Bearer <token>` (for
  scripts and scrapers), or as the session cookie that a first visit with `?token=` sets.
- A browser session gets its own CSRF token. An action (POST) from a cookie session needs it
  in the X-CSRF-Token header, and is refused when the browser says it comes from another site
  (Origin not ours, or Sec-Fetch-Site cross-site): a page elsewhere can make the browser send
  our cookie, never read the CSRF token or set that header. A bearer request carries no
  ambient credential, so a cross-site page cannot forge one, and needs no CSRF token.

The decisions are pure functions of the request's headers; server.py maps them to 401/403.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_FILE = "dashboard.token"  # noqa: S105  (a file name)
COOKIE = "gpuwarden_session"
CSRF_HEADER = "X-CSRF-Token"
MAX_SESSIONS = 256  # the oldest browser session is forgotten past this


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def load_or_create_token(path: Path, group_gid: int | None = None) -> str:
    """The token at `path`; a new random one (born 0640) if there is none or it is empty."""
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.fchmod(fd, 0o640)  # whatever the umask was
        if group_gid is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, group_gid)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return token


def read_token(path: Path) -> str:
    """The token for `gpuwarden dashboard`; OSError if the daemon has not written it."""
    token = path.read_text().strip()
    if not token:
        raise FileNotFoundError(f"{path} is empty")
    return token


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int  # 200 allowed, 401 no or wrong credentials, 403 refused action
    reason: str = ""
    session: str | None = None  # the cookie session it came with, if any


OK = Verdict(200)


class Auth:
    """The token and the browser sessions opened with it (in memory: a restart asks each
    browser for the token again)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session id -> CSRF token

    def open_session(self, offered: str) -> str | None:
        """A new session id for a first visit that offered the right token, else None."""
        if not _same(offered, self.token):
            return None
        session = secrets.token_urlsafe(32)
        self._sessions[session] = secrets.token_urlsafe(32)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def csrf(self, session: str) -> str | None:
        return self._sessions.get(session)

    def check(
        self,
        method: str,
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        origin: str,
    ) -> Verdict:
        """May this request go on? `origin` is ours ("http://host:port" as the client sees
        it, from its Host header)."""
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            if _same(auth.removeprefix("Bearer ").strip(), self.token):
                return OK
            return Verdict(401, "wrong token")
        session = cookies.get(COOKIE, "")
        csrf = self._sessions.get(session) if session else None
        if csrf is None:
            return Verdict(401, "a token is needed: open the URL `gpuwarden dashboard` prints")
        if method in ("GET", "HEAD"):
            return Verdict(200, session=session)
        return self._action(headers, origin, session, csrf)

    @staticmethod
    def _action(headers: Mapping[str, str], origin: str, session: str, csrf: str) -> Verdict:
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return Verdict(403, f"cross-site request refused ({site})")
        sent_origin = headers.get("Origin")
        if sent_origin is not None and sent_origin != origin:
            return Verdict(403, "cross-site request refused (origin)")
        if not _same(headers.get(CSRF_HEADER, ""), csrf):
            return Verdict(403, "missing or wrong CSRF token")
        return Verdict(200, session=session)
