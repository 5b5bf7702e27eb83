"""The README's journalctl recipes, run against a real systemd-journald.

A private mount namespace (`unshare --mount`) gets tmpfs over /run/systemd, /run/log and
/var/log, so the journald started there is the only one its clients see and it keeps its
journal in memory; the host's logging is untouched. The daemon's own logging setup
(gpuwarden.system.logs.configure in journal mode) writes events like the ones the services log,
then every recipe runs with `-u gpuwarden` replaced by `-t gpuwarden` (there is no unit here;
the daemon's entries carry SYSLOG_IDENTIFIER=gpuwarden), `-f` dropped and `-o json` forced.
Each must find entries, and only entries that satisfy its FIELD=value matches.

Needs root, unshare and systemd-journald; skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The recipe parser is the docs-fields unit test's (tests/unit is not a package: load by path).
_spec = importlib.util.spec_from_file_location(
    "docs_fields", Path(__file__).parents[1] / "unit" / "test_docs_journald_fields.py"
)
assert _spec is not None and _spec.loader is not None
_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_docs)
MATCH = _docs.MATCH
journalctl_commands = _docs.journalctl_commands

JOURNALD = next(
    (p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
     if os.access(p, os.X_OK)),
    None,
)  # fmt: skip
SKIPPED = 77

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or JOURNALD is None or not shutil.which("unshare"),
    reason="needs root, unshare and systemd-journald",
)

# Runs inside the namespace: argv[1] is journald, argv[2] the recipes (JSON), argv[3] the ids.
DRIVER = r"""
import json, subprocess, sys, time
from pathlib import Path

journald, recipes, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for target in ("/run/systemd", "/run/log", "/var/log"):
    Path(target).mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target]).returncode != 0:
        sys.exit(77)
Path("/run/systemd/journal").mkdir()
jd = subprocess.Popen([journald], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def wait_for(check, what):
    deadline = time.monotonic() + 10
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)

def journal(*args):
    out = subprocess.run(["journalctl", "--no-pager", *args], capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

try:
    wait_for(lambda: Path("/run/systemd/journal/socket").is_socket(), "the journal socket")
    import structlog
    from gpuwarden.system import logs as glog

    glog.configure(mode="journal")
    log = structlog.get_logger("gpuwarden.services.test")
    iid, jid, other = ids["instance"], ids["job"], "77aa88bb"
    log.info("instance_launched", instance_id=iid, provider="vast", job_id=jid, gpu="RTX 4090")
    log.info("instance_running", instance_id=iid, provider="vast")
    log.info("instance_terminating", instance_id=iid, provider="vast", reason="watchdog")
    log.info("instance_terminated", instance_id=iid, provider="vast", reason="watchdog", cost=0.42)
    log.warning("instance_vanished", instance_id=other, provider="lambda", reason="vanished")
    log.warning("launch_failed", instance_id="99cc00dd", provider="lambda", reason="launch_failed")
    log.error("destroy_retry", instance_id=other, provider="lambda", attempts=12, error="HTTP 502")
    log.info("config_reloaded", changed=["policy.idle_timeout"], needs_restart=[])
    sent = 8
    # Recipes elsewhere in the README name other events (probe_failed, ...): one entry each.
    named = {w.split("=", 1)[1] for argv in recipes for w in argv if w.startswith("EVENT=")}
    for event in sorted(named - {"instance_launched", "instance_running", "instance_terminating",
                                 "instance_terminated", "instance_vanished", "launch_failed",
                                 "destroy_retry", "config_reloaded"}):
        log.info(event, instance_id=iid, provider="vast")
        sent += 1
    wait_for(lambda: len(journal("-t", "gpuwarden", "-o", "json")) >= sent, "the entries")

    results = []
    for argv in recipes:
        args, i = [], 1
        while i < len(argv):
            a = argv[i]
            if a == "-u":
                args += ["-t", argv[i + 1]]; i += 2; continue
            if a == "-o":
                i += 2; continue
            if a == "-f":
                i += 1; continue
            args.append(a); i += 1
        results.append({"recipe": argv, "entries": journal(*args, "-o", "json")})
    print(json.dumps(results))
finally:
    jd.terminate()
    jd.wait(10)
"""


def recipes() -> list[list[str]]:
    """The docs' journalctl commands that name no placeholder ('...')."""
    out = []
    for _doc, words in journalctl_commands():
        if any("..." in w for w in words):
            continue
        out.append(words)
    return out


def test_journalctl_recipes_find_what_they_promise() -> None:
    assert JOURNALD is not None
    cmds = recipes()
    values = {m.group(1): m.group(2) for w in cmds for m in map(MATCH.match, w) if m}
    ids = {"instance": values["INSTANCE_ID"], "job": values["JOB_ID"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER,
         JOURNALD, json.dumps(cmds), json.dumps(ids)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    if result.returncode == SKIPPED:
        pytest.skip("cannot mount tmpfs in a private mount namespace here")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert len(results) == len(cmds) >= 8

    for item in results:
        recipe, entries = item["recipe"], item["entries"]
        shown = " ".join(recipe)
        assert entries, f"{shown}: found nothing"
        wanted: dict[str, set[str]] = {}
        for word in recipe:
            m = MATCH.match(word)
            if m:
                wanted.setdefault(m.group(1), set()).add(m.group(2))
        for entry in entries:
            assert entry["SYSLOG_IDENTIFIER"] == "gpuwarden", shown
            for field, allowed in wanted.items():
                assert entry.get(field) in allowed, f"{shown}: {entry.get('MESSAGE')}"
            if "-p" in recipe and recipe[recipe.index("-p") + 1] == "err":
                assert int(entry["PRIORITY"]) <= 3, f"{shown}: {entry.get('MESSAGE')}"
        if "-n" in recipe:
            assert len(entries) <= int(recipe[recipe.index("-n") + 1]), shown
