"""The dead-man switch's start-up script: what every launch hands the provider's start-up hook
(Vast `onstart`, Lambda `user_data`) so that an instance ends itself when the daemon goes
silent.

The script writes remote/assets/deadman.sh onto the instance (gzip + base64, with its
full-line comments stripped, to stay inside Vast's 4048-character onstart limit), writes its
parameters next to it, and starts it. Every value placed in the script is ours (numbers, the
configured API URL, our label, an opted-in key), never user text, and each is shell-quoted.

Per provider:
- Vast: the switch calls DELETE on its own instance with the instance-scoped key that Vast puts
  in the container's environment (CONTAINER_API_KEY, CONTAINER_ID). The account key never
  goes onto the instance.
- Lambda: there is no instance-scoped key. Only if the operator opted in
  (policy.lambda_deadman_api_key) is the account key written into user_data; the switch then
  finds its own id by its name (our label) and terminates itself. Without the opt-in it only
  warns: a powered-off Lambda instance still bills, so shutting down would not help.
- Sim: the instance sees its provider's URL in $GPUWARDEN_SIM_API, which overrides the base.
"""

from __future__ import annotations

import base64
import gzip
import re
import shlex
from typing import Literal

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import instance_label
from gpuwarden.remote.deploy import deploy_file

ProviderKind = Literal["vast", "lambda"]

VAST_API = "https://console.vast.ai"
LAMBDA_API = "https://cloud.lambda.ai/api/v1"
ONSTART_LIMIT = 4048  # Vast's limit on `onstart`, in characters
SSH_USER: dict[str, str] = {"vast": "root", "lambda": "ubuntu"}

_SAFE_URL = re.compile(r"^https?://[A-Za-z0-9._~:/%@\[\]-]+$")


def provider_kind(provider_name: str) -> ProviderKind | None:
    """`vast`/`sim-vast` -> "vast", `lambda`/`sim-lambda` -> "lambda", otherwise None
    (a provider without a dead-man switch, such as the unit tests' fake)."""
    base = provider_name.removeprefix("sim-")
    if base == "vast":
        return "vast"
    if base == "lambda":
        return "lambda"
    return None


def default_api_base(kind: ProviderKind, settings: Settings) -> str:
    """The API base URL the instance should call (the configured one, else the public one)."""
    configured = (
        settings.providers.vast.base_url if kind == "vast" else settings.providers.lambda_.base_url
    )
    return (configured or (VAST_API if kind == "vast" else LAMBDA_API)).rstrip("/")


def switch_api_key(settings: Settings, provider_name: str) -> str | None:
    """The account key a Lambda instance's switch gets: only with the operator's opt-in
    (policy.lambda_deadman_api_key), and only when there is one (for `sim-lambda` the sim's
    key, which defaults to SIM_DEFAULT_KEY). None otherwise, and always for Vast, whose
    switch uses the instance's own key."""
    if provider_kind(provider_name) != "lambda" or not settings.policy.lambda_deadman_api_key:
        return None
    conf = settings.providers
    if provider_name.startswith("sim-"):
        return conf.sim.effective_api_key()
    secret = conf.lambda_.api_key
    return (secret.get_secret_value() if secret is not None else "") or None


def switch_can_end(settings: Settings, provider_name: str) -> bool:
    """Whether an instance of this provider carries a switch able to end it: always on Vast
    (the instance-scoped key), on Lambda only with an account key on it (see above)."""
    kind = provider_kind(provider_name)
    if kind == "vast":
        return True
    return kind == "lambda" and switch_api_key(settings, provider_name) is not None


def shipped_deadman() -> str:
    """deadman.sh as it travels: blank lines, full-line comments and indentation dropped (the
    shebang kept), except inside its Python here-documents, where indentation is syntax."""
    lines: list[str] = []
    heredoc = False
    for ln in deploy_file("deadman.sh").splitlines():
        if heredoc:
            lines.append(ln)
            heredoc = ln != "PY"
        elif ln.strip() and not ln.lstrip().startswith("#"):
            lines.append(ln.lstrip())
            heredoc = "<<'PY'" in ln
    return "#!/bin/sh\n" + "\n".join(lines) + "\n"


def check_interval(timeout_s: int) -> int:
    """How often the switch looks: a sixth of the timeout, between 1 and 30 seconds."""
    return max(1, min(30, round(timeout_s / 6)))


def onstart_script(
    settings: Settings,
    provider_kind: ProviderKind,
    api_base: str,
    instance_id: str,
    api_key: str | None = None,
) -> str:
    """The start-up script for one instance. `instance_id` is our id (the label is derived
    from it); `api_key` is used only for Lambda and only with policy.lambda_deadman_api_key.

    Raises ValueError for a URL that is not a plain http(s) URL, or when a Vast script would
    not fit Vast's onstart limit."""
    if provider_kind not in SSH_USER:
        raise ValueError(f"no dead-man switch for provider kind {provider_kind!r}")
    base = api_base.rstrip("/")
    if not _SAFE_URL.match(base):
        raise ValueError(f"API base {api_base!r} is not a plain http(s) URL")
    policy = settings.policy
    timeout = max(1, round(policy.deadman_timeout.total_seconds()))
    max_age = round((policy.hard_cap + policy.deadman_margin).total_seconds())
    label = instance_label(settings.daemon.installation, instance_id)
    q = shlex.quote
    env_lines = [
        f"DEADMAN_PROVIDER={provider_kind}",
        # Expanded when the switch sources the file: the sim tells the instance its own URL.
        f"DEADMAN_API=${{GPUWARDEN_SIM_API:-{q(base)}}}",
        f"DEADMAN_TIMEOUT={timeout}",
        f"DEADMAN_MAX_AGE={max_age}",
        f"DEADMAN_CHECK={check_interval(timeout)}",
        f"DEADMAN_LABEL={q(label)}",
    ]
    payload = base64.b64encode(gzip.compress(shipped_deadman().encode(), 9, mtime=0)).decode()
    user = SSH_USER[provider_kind]
    parts = [
        "#!/bin/sh",
        "# gpuwarden: install and start the dead-man switch",
        # The probe refreshes .gpuwarden/heartbeat in the SSH user's home; watch that one.
        'H="${HOME:-/root}"',
        f'if [ -z "${{GPUWARDEN_SIM_INSTANCE:-}}" ] && [ "$(id -un)" != {user} ]'
        f" && getent passwd {user} >/dev/null 2>&1; then"
        f' H="$(getent passwd {user} | cut -d: -f6)"; fi',
        'D="$H/.gpuwarden"',
        'mkdir -p "$D" && cd "$D" || exit 1',
        "umask 077",
        "cat > deadman.env <<'GPUWARDEN_EOF'",
        *env_lines,
        "GPUWARDEN_EOF",
        # Through a new file and a rename: a switch already running keeps reading its own.
        f"echo {payload} | base64 -d | gzip -dc > deadman.sh.new || exit 1",
        "mv -f deadman.sh.new deadman.sh",
    ]
    if provider_kind == "lambda" and policy.lambda_deadman_api_key and api_key:
        # The operator's opt-in: an account-wide key on the rented machine (see the README).
        parts.append(f"printf '%s' {q(api_key)} > deadman.key")
    parts += [
        "[ -f heartbeat ] || touch heartbeat",
        f'if [ "$(id -u)" = 0 ] && [ {user} != root ] && id {user} >/dev/null 2>&1;'
        f' then chown -R {user}: "$D"; fi',
        'DEADMAN_DIR="$D" sh "$D/deadman.sh"',
        "",
    ]
    script = "\n".join(parts)
    if provider_kind == "vast" and len(script) > ONSTART_LIMIT:  # Lambda allows 1 MB
        raise ValueError(f"start-up script is {len(script)} characters (limit {ONSTART_LIMIT})")
    return script
