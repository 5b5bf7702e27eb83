"""The dashboard's access rules (pure), its token file and its settings."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gpuwarden.config import settings as config
from gpuwarden.config.settings import ConfigError, Settings
from gpuwarden.web.auth import COOKIE, CSRF_HEADER, MAX_SESSIONS, Auth, load_or_create_token

ORIGIN = "http://127.0.0.1:8092"


def session(auth: Auth) -> tuple[str, str]:
    sid = auth.open_session("secret")
    assert sid is not None
    csrf = auth.csrf(sid)
    assert csrf is not None
    return sid, csrf


def test_no_credentials_or_a_wrong_one_is_401() -> None:
    auth = Auth("secret")
    assert auth.check("GET", {}, {}, ORIGIN).status == 401
    assert auth.check("GET", {"Authorization": "Bearer nope"}, {}, ORIGIN).status == 401
    assert auth.check("GET", {}, {COOKIE: "forged"}, ORIGIN).status == 401
    assert auth.open_session("nope") is None


def test_the_bearer_token_or_a_session_cookie_reads() -> None:
    auth = Auth("secret")
    assert auth.check("GET", {"Authorization": "Bearer secret"}, {}, ORIGIN).status == 200
    sid, _ = session(auth)
    verdict = auth.check("GET", {}, {COOKIE: sid}, ORIGIN)
    assert verdict.status == 200 and verdict.session == sid


def test_an_action_from_a_session_needs_its_csrf_token_and_our_origin() -> None:
    auth = Auth("secret")
    sid, csrf = session(auth)
    _, other_csrf = session(auth)
    cookies = {COOKIE: sid}
    good = {CSRF_HEADER: csrf, "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}
    assert auth.check("POST", good, cookies, ORIGIN).status == 200
    assert auth.check("POST", {CSRF_HEADER: csrf}, cookies, ORIGIN).status == 200  # old browsers
    refused = [
        {},  # no CSRF token
        {CSRF_HEADER: other_csrf},  # another session's
        {**good, "Origin": "http://evil.example"},
        {**good, "Sec-Fetch-Site": "cross-site"},
        {**good, "Sec-Fetch-Site": "same-site"},  # another port on this host is another site
    ]
    for headers in refused:
        verdict = auth.check("POST", headers, cookies, ORIGIN)
        assert verdict.status == 403, headers
        assert verdict.reason


def test_sessions_are_bounded_oldest_first() -> None:
    auth = Auth("secret")
    first, _ = session(auth)
    for _ in range(MAX_SESSIONS):
        session(auth)
    assert auth.csrf(first) is None
    assert auth.check("GET", {}, {COOKIE: first}, ORIGIN).status == 401


def test_the_token_file_is_born_0640_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dashboard.token"
    token = load_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert load_or_create_token(path) == token  # a restart keeps the URL working
    path.write_text("\n")
    assert load_or_create_token(path) not in ("", token)  # an emptied file gets a new one


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_dashboard_is_off_by_default_and_loopback_is_accepted() -> None:
    assert Settings().dashboard.listen is None
    assert not Settings().metrics.public
    for listen in ("127.0.0.1:8092", "[::1]:8092", "localhost:0"):
        assert Settings(dashboard={"listen": listen}).dashboard.listen == listen


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("0.0.0.0:8092", "not a loopback address"),
        ("192.168.1.5:8092", "not a loopback address"),
        ("example.com:8092", "not a loopback address"),
        ("8092", "is not HOST:PORT"),
        ("127.0.0.1:99999", "out of range"),
    ],
)
def test_a_listen_address_beyond_loopback_or_malformed_is_refused(
    tmp_path: Path, listen: str, why: str
) -> None:
    path = write(tmp_path, f'[dashboard]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path)
    [(field, reason, _)] = err.value.problems
    assert field == "dashboard.listen"
    assert why in reason


def test_allow_remote_lets_another_address_through_on_purpose(tmp_path: Path) -> None:
    path = write(tmp_path, '[dashboard]\nallow_remote = true\nlisten = "0.0.0.0:8092"\n')
    assert config.load(path).dashboard.listen == "0.0.0.0:8092"
