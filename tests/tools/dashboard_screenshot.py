"""Take docs/dashboard.png, the README's screenshot of the dashboard, in the demo's setup.

    .venv/bin/python tests/tools/dashboard_screenshot.py [OUT.png]

The daemon runs on config.example.toml in a temporary state dir (the simulated cloud only),
as in `make demo`, with a daily budget so the chart has its line and keep-warm long enough
that the instances are still listed; three jobs run (one long), one instance is launched by
hand, and Debian's Chromium (driven by Playwright) photographs the page.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.demo import Demo, demo_env, find_config

ROOT = Path(__file__).resolve().parents[2]
# The browser tests' launch settings, so the picture is taken as the tests see the page.
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]
from browser_support import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

JOBS = [
    ("a lighthouse on a cliff at dusk, oil painting", 8),
    ("a red fox in fresh snow", 8),
    ("a very slow watercolour of a harbour", 400),
]


async def wait_jobs(demo: Demo, ids: list[str], done: int) -> None:
    async with ControlClient(demo.socket) as client, asyncio.timeout(120):
        while True:
            states = [(await client.call("jobs.get", {"id": i}))["state"] for i in ids]
            if states.count("succeeded") >= done and "queued" not in states:
                return
            await asyncio.sleep(0.5)


async def main(out: Path) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gpuwarden-shot-"))
    env = demo_env(workdir) | {
        "GPUWARDEN_JOBS__KEEP_WARM": "30m",
        "GPUWARDEN_BUDGET__DAILY_LIMIT": "10",
        "GPUWARDEN_JOBS__PREVIEW_STEP_DELAY": "100ms",
    }
    demo = Demo(config=find_config(None), workdir=workdir, env=env, verbose=False)
    try:
        await demo.start_daemon()
        await demo.wait_for("daemon_ready")
        ids = []
        for prompt, steps in JOBS:
            _, got, _ = await demo.gpuwarden(
                "submit", "--prompt", prompt, "--steps", str(steps), "--json"
            )
            ids.append(json.loads(got)["id"])
        await demo.gpuwarden("launch", "--gpu", "A100", "--hours", "1", "--yes", "--json")
        _, got, _ = await demo.gpuwarden(
            "launch", "--gpu", "RTX", "--hours", "1", "--yes", "--json"
        )
        await wait_jobs(demo, ids, done=2)
        await demo.gpuwarden("destroy", json.loads(got)["id"])  # one in the history
        _, got, _ = await demo.gpuwarden("dashboard", "--config", str(demo.config), "--json")
        url = json.loads(got)["url"]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(url)
            await page.locator("#live.on").wait_for()
            await page.locator("img.thumb").first.wait_for()
            await page.wait_for_function(
                "[...document.images].every((i) => i.complete && i.naturalWidth > 0)"
            )
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
        print(f"wrote {out}")
        return 0
    finally:
        await demo.stop_daemon()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png"
    sys.exit(asyncio.run(main(target)))
