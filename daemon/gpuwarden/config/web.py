"""Settings of the HTTP listener: the dashboard and its /metrics (both off by default).

Kept apart from settings.py only for size; Settings holds them as `dashboard` and `metrics`.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_listen(value: str) -> tuple[str, int]:
    """ "127.0.0.1:8092" or "[::1]:8092" -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT (such as '127.0.0.1:8092')")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0..65535)")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class DashboardSettings(_Section):
    # Declared before `listen`, whose check reads it.
    allow_remote: bool = False
    listen: str | None = None  # "127.0.0.1:8092"; unset: no HTTP listener at all
    # Who the dashboard's actions are recorded as: "dashboard:<token_name>".
    token_name: str = Field(default="operator", pattern=r"^[A-Za-z0-9_.-]{1,40}$")

    @field_validator("listen")
    @classmethod
    def _loopback_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        host, _ = split_listen(v)
        if not is_loopback(host) and not info.data.get("allow_remote", False):
            raise ValueError(
                f"{host} is not a loopback address; the dashboard controls paid GPUs, so set"
                " dashboard.allow_remote = true to serve it beyond this machine on purpose"
            )
        return v


class MetricsSettings(_Section):
    # /metrics without the dashboard token (for a scraper that cannot send one).
    public: bool = False
