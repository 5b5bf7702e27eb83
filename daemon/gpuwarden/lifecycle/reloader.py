"""Config reload (SIGHUP, or `config.reload` on the control socket).

An invalid file is refused with an error log and the running config stays, whatever is
wrong with it: a reload must never end the daemon, since the same file would then stop every
restart too and nothing would end instances. An empty file is refused as well: on a reload it
is far more likely a truncated write than a wish to put every limit back to its default. A
valid one
replaces `app.settings` (loops re-read it on each pass) and wakes the guard and the job
queue, since limits and deadlines may have moved. Settings read only at start-up (paths,
providers, SSH) are reported as needing a restart for as long as the file differs from
the values the daemon started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from gpuwarden.config import settings as config
from gpuwarden.config.settings import ConfigError
from gpuwarden.core.model import CONFIG_RELOADED, EntityKind
from gpuwarden.fleet import installation
from gpuwarden.fleet.app import App
from gpuwarden.system import logs as glog
from gpuwarden.system.systemd import Notifier

log = structlog.get_logger(__name__)

# Read once at start-up; a reload that changes them only takes effect after a restart.
RESTART_ONLY = (
    "daemon.state_dir",
    "daemon.socket",
    "daemon.installation",
    "providers.",
    "ssh.",
    "dashboard.listen",
    "dashboard.allow_remote",
)


class ConfigReloader:
    def __init__(self, app: App, path: Path, notifier: Notifier, status: Callable[[], str]) -> None:
        self.app = app
        self.path = path
        self.notifier = notifier
        self.status = status
        # What the restart-only settings are in force as: a reload does not change them,
        # so "needs a restart" compares with these, not with the file read last.
        self.started = app.settings.model_dump(by_alias=True)

    async def run(self, requested: asyncio.Event) -> None:
        """Reload each time `requested` is set (the SIGHUP handler sets it)."""
        while True:
            await requested.wait()
            requested.clear()
            await self.reload()

    def _load(self) -> config.Settings:
        if self.path.is_file() and not config.read_toml(self.path):
            raise ConfigError(
                [
                    (
                        "(file)",
                        "the file is empty; restart the daemon to run on the defaults",
                        str(self.path),
                    )
                ]
            )
        return config.load(self.path)

    def _refused(self, problems: list[str]) -> dict[str, Any]:
        log.error("config_reload_refused", path=str(self.path), problems=problems)
        self.notifier.ready(self.status())
        return {"reloaded": False, "problems": problems}

    async def reload(self, by: str = "SIGHUP") -> dict[str, Any]:
        """Re-read the file; returns what happened (for the control socket's answer). `by`:
        who asked (the event's "by": a signal, or the control socket's caller)."""
        app = self.app
        self.notifier.reloading(int(app.clock.monotonic() * 1_000_000))
        try:
            new = self._load()
        except ConfigError as exc:
            problems = [f"{f}: {reason} (from {where})" for f, reason, where in exc.problems]
            return self._refused(problems)
        except Exception as exc:  # a bug in validation must not take the daemon down
            log.exception("config_reload_failed", path=str(self.path))
            return self._refused([f"(file): could not be read: {exc!r}"])
        new = installation.pinned(new, app.installation)  # the label in force stays
        glog.register_secrets_from(new)
        # Python-mode dumps: SecretStr compares by value, so a changed key is noticed.
        changed = changed_keys(
            app.settings.model_dump(by_alias=True), new.model_dump(by_alias=True)
        )
        pending = changed_keys(self.started, new.model_dump(by_alias=True))
        needs_restart = [k for k in pending if k.startswith(RESTART_ONLY)]
        if new.daemon.log_level != app.settings.daemon.log_level:
            glog.set_level(new.daemon.log_level)
        app.settings = new
        # Recorded, and the record is what wakes the guard: new limits may move deadlines.
        await app.store.record(
            EntityKind.DAEMON,
            "daemon",
            CONFIG_RELOADED,
            {"changed": changed, "needs_restart": needs_restart, "by": by},
        )
        app.jobs_wake.set()
        log.info("config_reloaded", changed=changed, needs_restart=needs_restart)
        self.notifier.ready(self.status())
        return {"reloaded": True, "changed": changed, "needs_restart": needs_restart}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]
