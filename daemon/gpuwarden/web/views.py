"""What the dashboard page reads and does: the same service functions the control socket
calls (control/instances.py, control/jobs.py), so a button and a CLI command do one thing.
Every action is recorded with who did it ("dashboard:<token_name>")."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from gpuwarden.control import instances
from gpuwarden.control import jobs as jobs_api
from gpuwarden.control.events import event_json
from gpuwarden.core import errors
from gpuwarden.fleet.app import App

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}
MAX_EXTEND_H = 24 * 365.0
RECENT_EVENTS = 30


def actor(app: App) -> str:
    return f"dashboard:{app.settings.dashboard.token_name}"


def _thumbs(output_dir: Path, outputs: list[str]) -> list[str]:
    """URLs of the images under the outputs dir (anything else is not served)."""
    root = output_dir.resolve()
    urls = []
    for out in outputs:
        path = Path(out).resolve()
        if path.suffix.lower() in IMAGE_TYPES and path.is_relative_to(root):
            urls.append("/outputs/" + quote(path.relative_to(root).as_posix()))
    return urls


async def state(app: App) -> dict[str, Any]:
    """Everything the page shows, in one answer."""
    listed = await jobs_api.list(app, None, 50)
    for job in listed:
        job["thumbs"] = _thumbs(app.settings.output_dir, job["outputs"])
    return {
        "installation": app.installation,
        "actor": actor(app),
        "status": await instances.status(app),
        "jobs": listed,
        "history": await instances.history(app, 24 * 7),
        "costs": await instances.costs(app, 30),
        # The tail of the event log, oldest first; the page's stream adds to it.
        "events": [event_json(e) for e in await app.store.events(limit=RECENT_EVENTS, newest=True)],
    }


def output_file(output_dir: Path, rel: str) -> tuple[Path, str]:
    """The image at `rel` under the outputs dir and its type; NotFound for anything else
    (a path out of the dir, a link out of it, another kind of file)."""
    root = output_dir.resolve()
    path = (root / rel).resolve()
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_relative_to(root) or not path.is_file():
        raise errors.NotFound(f"no image {rel!r}", id=rel)
    return path, kind


def hours_of(body: Any) -> float:
    """The `hours` of an extend request; InvalidInput with the reason otherwise."""
    hours = body.get("hours") if isinstance(body, dict) else None
    if isinstance(hours, bool) or not isinstance(hours, int | float):
        raise errors.InvalidInput('give {"hours": <number>} to extend a lease')
    if not 0 < hours <= MAX_EXTEND_H:
        raise errors.InvalidInput(f"hours must be more than 0 and at most {MAX_EXTEND_H:g}")
    return float(hours)


async def act(app: App, action: str, iid: str, body: Any) -> dict[str, Any]:
    by = actor(app)
    if action == "extend":
        return await instances.extend(app, iid, hours_of(body), by=by)
    if action == "activity":
        return await instances.activity(app, iid, by=by)
    if action == "destroy":
        return await instances.destroy(app, iid, by=by)
    raise errors.NotFound(f"no action {action!r}", id=action)
