"""Settings: a TOML file, overridden by GPUWARDEN_<SECTION>__<KEY> variables, secrets from
systemd credentials ($CREDENTIALS_DIRECTORY) or the environment.

A bad config never half-starts the daemon: `load` raises ConfigError naming every bad field
by its dotted path, with the reason and where the value came from; the CLI exits 78.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gpuwarden.config.durations import Duration, format_duration, parse_duration
from gpuwarden.config.paths import DEFAULT_SOCKET, ENV_NESTED, ENV_PREFIX, resolve_path
from gpuwarden.config.schedule import WarmWindow
from gpuwarden.config.values import PublicKey, against_file
from gpuwarden.config.web import DashboardSettings, MetricsSettings
from gpuwarden.core.model import NotifyKind

EX_CONFIG = 78

Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Uid = Annotated[int, Field(ge=0, lt=2**32 - 1)]  # (uid_t)-1 means "no uid" to the kernel

# Valid but absurd values are refused with the reason rather than taken: a poll of 0 s pins a
# core, a request timeout of 0 s fails every CLI call, a shutdown timeout of 0 s makes every
# stop exit 1, and a hard cap of weeks no longer catches a forgotten GPU.
FLOORS = {
    "shutdown_timeout": timedelta(seconds=1),
    "request_timeout": timedelta(seconds=1),
    "poll_interval": timedelta(seconds=1),
    "watchdog_interval": timedelta(seconds=1),
    "probe_timeout": timedelta(seconds=1),
}
HARD_CAP_CEILING = timedelta(hours=72)


def _at_least(v: timedelta, info: ValidationInfo) -> timedelta:
    floor = FLOORS[str(info.field_name)]
    if v < floor:
        raise ValueError(f"must be at least {format_duration(floor)}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonSettings(_Section):
    state_dir: Path = Path("/var/lib/gpuwarden")
    socket: Path = DEFAULT_SOCKET
    socket_group: str | None = None
    allowed_uids: list[Uid] = Field(default_factory=list)
    installation: str = Field(default="main", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    shutdown_timeout: Duration = timedelta(seconds=10)
    request_timeout: Duration = timedelta(seconds=30)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Warn (state_disk_low) while the state dir's disk has less free space than this; 0: never.
    low_disk_mb: float = Field(default=500.0, ge=0, allow_inf_nan=False)

    _floors = field_validator("shutdown_timeout", "request_timeout")(_at_least)


class PolicySettings(_Section):
    # Defaults are validated too, so that lease_default = "9h" alone is caught by the
    # lease_max check instead of slipping past the 8h default.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    idle_timeout: Duration = timedelta(minutes=30)
    lease_default: Duration = timedelta(hours=4)
    lease_min: Duration = timedelta(hours=1)
    lease_max: Duration = timedelta(hours=8)
    hard_cap: Duration = timedelta(hours=8)
    watchdog_interval: Duration = timedelta(minutes=5)
    watchdog_failures: int = Field(default=2, ge=1)
    probe_timeout: Duration = timedelta(seconds=20)
    gpu_busy_percent: float = Field(default=10.0, ge=0, le=100)
    poll_interval: Duration = timedelta(seconds=30)
    vanish_grace: Duration = timedelta(seconds=60)
    deadman_timeout: Duration = timedelta(minutes=20)
    deadman_margin: Duration = timedelta(minutes=10)
    lambda_deadman_api_key: bool = False  # opt in: put the account key on Lambda instances

    _floors = field_validator("poll_interval", "watchdog_interval", "probe_timeout")(_at_least)

    # Field validators (not a model validator) so that an error names the field at fault.
    @field_validator("lease_min")
    @classmethod
    def _min_le_default(cls, v: timedelta, info: ValidationInfo) -> timedelta:
        default = info.data.get("lease_default")
        if default is not None and v > default:
            raise ValueError(f"must not exceed lease_default ({format_duration(default)})")
        return v

    @field_validator("lease_max")
    @classmethod
    def _max_ge_default(cls, v: timedelta, info: ValidationInfo) -> timedelta:
        default = info.data.get("lease_default")
        if default is not None and v < default:
            raise ValueError(f"must be at least lease_default ({format_duration(default)})")
        return v

    @field_validator("hard_cap")
    @classmethod
    def _cap_ge_max(cls, v: timedelta, info: ValidationInfo) -> timedelta:
        if v > HARD_CAP_CEILING:
            raise ValueError(
                f"must be at most {format_duration(HARD_CAP_CEILING)}: a cap of more than three"
                " days no longer catches a forgotten GPU"
            )
        lease_max = info.data.get("lease_max")
        if lease_max is not None and v < lease_max:
            raise ValueError(
                f"must be at least lease_max ({format_duration(lease_max)}):"
                " nothing outlives the cap"
            )
        return v


class BudgetSettings(_Section):
    max_hourly_price: Price | None = None
    daily_limit: Price | None = None
    monthly_limit: Price | None = None
    credit_floor: Price = 0.0


class ProviderSettings(_Section):
    enabled: bool = False
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout: Duration = timedelta(seconds=30)
    max_retries: int = Field(default=4, ge=0, le=10)


class SimFaultSettings(_Section):
    """Fault knobs of the simulated cloud (also settable at run time: POST /_sim/faults)."""

    latency: Duration = timedelta(0)  # added before every API answer
    rate_5xx: float = Field(default=0.0, ge=0, le=1)  # share of API calls answered 5xx
    rate_429: float = Field(default=0.0, ge=0, le=1)  # share of API calls answered 429
    create_error_exists: int = Field(default=0, ge=0)  # next N creates: error, yet it exists
    list_lag: Duration = timedelta(0)  # listings show new ones late and ended ones still
    destroy_noop: int = Field(default=0, ge=0)  # next N destroys answer success, do nothing
    end_on_zero_credit: bool = False  # at zero credit also end the running instances
    # Spot instances (rented with a bid) outbid at random: so many per hour of sim time a
    # running one has (Vast only; POST /_sim/instances/{id}/outbid outbids one now).
    outbid_rate: float = Field(default=0.0, ge=0, le=3600)
    seed: int = 0  # of the random draws for the rates


SIM_DEFAULT_KEY = "sim-key"  # the API key of the simulated cloud when api_key is unset


class SimSettings(ProviderSettings):
    """The simulated cloud, run inside the daemon (demo) or standalone (`gpuwarden sim`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0: any free port
    boot_delay: Duration = timedelta(seconds=1)
    credit: Price = 100.0
    sandbox_dir: Path | None = None  # default: <state_dir>/sim
    faults: SimFaultSettings = SimFaultSettings()
    ssh: Literal["asyncssh", "openssh"] = "asyncssh"  # openssh: an sshd each (sim/openssh.py)

    def effective_api_key(self) -> str:
        """The key the sim accepts and its clients send: api_key, else SIM_DEFAULT_KEY."""
        return (self.api_key.get_secret_value() if self.api_key else "") or SIM_DEFAULT_KEY


class ProvidersSettings(_Section):
    vast: ProviderSettings = ProviderSettings()
    lambda_: ProviderSettings = Field(default=ProviderSettings(), alias="lambda")
    sim: SimSettings = SimSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def enabled(self) -> dict[str, ProviderSettings]:
        out: dict[str, ProviderSettings] = {}
        for name, s in (("vast", self.vast), ("lambda", self.lambda_), ("sim", self.sim)):
            if s.enabled:
                out[name] = s
        return out


def _keep_warm(value: object) -> str | timedelta:
    if value == "auto":
        return "auto"
    return parse_duration(value)


KeepWarm = Annotated[
    Literal["auto"] | timedelta,
    BeforeValidator(_keep_warm),
    PlainSerializer(
        lambda v: v if isinstance(v, str) else format_duration(v), return_type=str, when_used="json"
    ),
]


class JobsSettings(_Section):
    image: str = "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"
    hf_token: SecretStr | None = None  # for gated models; only diffusers jobs get it (runner.py)
    model: str = "stabilityai/sd-turbo"
    engine: Literal["auto", "diffusers", "preview"] = "auto"
    steps: int = Field(default=4, ge=1, le=500)
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    gpu_ram_gb: float = Field(default=8.0, ge=0)
    min_reliability: float = Field(default=0.95, ge=0, le=1)
    max_instances: int = Field(default=2, ge=1)
    keep_warm: KeepWarm = "auto"
    warm_schedule: list[WarmWindow] = Field(default_factory=list)  # see config/schedule.py
    # A second of a user's waiting, in GPU seconds: the dispatcher and keep-warm "auto" weigh
    # billed seconds + wait_weight * waiting seconds (0 = dollars only).
    wait_weight: float = Field(default=1.0, ge=0)
    output_dir: Path | None = None  # default: <state_dir>/outputs
    max_attempts: int = Field(default=3, ge=1)
    # Spot: jobs rent interruptible (bid) offers where the provider has them (Vast), bidding
    # the offer's minimum bid times bid_factor (never above the job's or the budget's price).
    interruptible: bool = True
    bid_factor: float = Field(default=1.2, ge=1.0, le=10.0)
    ssh_wait: Duration = timedelta(minutes=10)
    disk_gb: float = Field(default=20.0, gt=0)
    # A file from an instance larger than this fails its job instead of filling our disk.
    max_image_mb: float = Field(default=50.0, gt=0, le=10_000)
    # How often a running job's progress and status are read over SSH.
    progress_interval: Duration = timedelta(seconds=1)
    # The preview engine sleeps this long per step so that its progress can be seen.
    preview_step_delay: Duration = timedelta(milliseconds=250)


class SshSettings(_Section):
    private_key: SecretStr | None = None  # PEM text; usually from the credentials directory
    private_key_file: Path | None = None  # default: <state_dir>/ssh/id_ed25519, made if absent
    connect_timeout: Duration = timedelta(seconds=15)
    known_hosts: Path | None = None  # None: pin the key each instance shows first (hostkeys.py)
    # Operators' public keys, put on every instance (Vast at launch; both once SSH answers).
    authorized_keys: list[PublicKey] = Field(default_factory=list)


def _apprise_url(v: SecretStr) -> SecretStr:
    url = v.get_secret_value().strip()
    scheme = url.split("://", 1)[0] if "://" in url else ""
    # The message never quotes the URL: it may carry a token or a password.
    if not scheme:
        raise ValueError("not a URL: write it as scheme://..., e.g. ntfy://my-topic")
    import apprise  # only when URLs are set: the import costs half a second

    if apprise.Apprise.instantiate(url) is None:
        raise ValueError(f"apprise cannot use this {scheme}:// URL (an unknown or malformed one)")
    return SecretStr(url)


NotifyUrl = Annotated[SecretStr, AfterValidator(_apprise_url)]


class NotifySettings(_Section):
    """Notifications through apprise (notify/): where to, about what, and how often."""

    urls: list[NotifyUrl] = Field(default_factory=list)  # secrets: they carry tokens
    events: list[NotifyKind] = Field(default_factory=lambda: list(NotifyKind))
    lease_warning: Duration = timedelta(minutes=15)  # tell this long before a lease ends
    rate_per_minute: float = Field(default=6.0, gt=0, le=600)  # sustained sends
    burst: int = Field(default=10, ge=1, le=1000)  # sends allowed at once after a quiet spell
    queue_size: int = Field(default=100, ge=1, le=100_000)  # beyond it the oldest is dropped


class Settings(BaseSettings):
    """The whole configuration. Frozen: a reload builds a new one."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    daemon: DaemonSettings = DaemonSettings()
    policy: PolicySettings = PolicySettings()
    budget: BudgetSettings = BudgetSettings()
    providers: ProvidersSettings = ProvidersSettings()
    jobs: JobsSettings = JobsSettings()
    ssh: SshSettings = SshSettings()
    notify: NotifySettings = NotifySettings()
    dashboard: DashboardSettings = DashboardSettings()
    metrics: MetricsSettings = MetricsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed in as init kwargs); no .env files.
        return (env_settings, init_settings)

    @property
    def output_dir(self) -> Path:
        return self.jobs.output_dir or self.daemon.state_dir / "outputs"

    @property
    def db_path(self) -> Path:
        return self.daemon.state_dir / "gpuwarden.db"

    @property
    def lock_path(self) -> Path:
        return self.daemon.state_dir / "gpuwarden.lock"


# credential file name -> dotted setting
CREDENTIALS: dict[str, tuple[str, ...]] = {
    "vast_api_key": ("providers", "vast", "api_key"),
    "lambda_api_key": ("providers", "lambda", "api_key"),
    "ssh_private_key": ("ssh", "private_key"),
    "hf_token": ("jobs", "hf_token"),
}


class ConfigError(Exception):
    """Every problem with a config, each as (dotted field, reason, where the value came from)."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = ["invalid configuration:"]
        lines += [f"  {field}: {reason} (from {where})" for field, reason, where in self.problems]
        return "\n".join(lines)


def _set_in(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node.setdefault(path[-1], value)  # the file or env wins over a credential file


def _credentials(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return data
    for fname, path in CREDENTIALS.items():
        f = Path(cred_dir) / fname
        if f.is_file():
            _set_in(
                data, path, f.read_text().strip() if fname != "ssh_private_key" else f.read_text()
            )
    return data


def _location(
    loc: tuple[str | int, ...], raw: Mapping[str, Any], path: Path, env: Mapping[str, str]
) -> str:
    keys = [str(k) for k in loc]
    var = "GPUWARDEN_" + "__".join(k.upper() for k in keys)
    if var in env:
        return f"environment variable {var}"
    node: Any = raw
    for key in keys:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        else:
            return f"{path} or its defaults"
    return str(path)


def load(path: str | os.PathLike[str] | None = None, *, require_file: bool = True) -> Settings:
    """Load and validate. Raises ConfigError; never returns a half-valid Settings."""
    env = os.environ
    cfg_path = resolve_path(path)
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        raw = read_toml(cfg_path)
    elif require_file:
        raise ConfigError([("(file)", "no such file", str(cfg_path))])
    data = _credentials(against_file(_deep_copy(raw), Settings, cfg_path.parent), env)
    try:
        settings = Settings(**data)
    except SettingsError as exc:  # a complex value in the environment that is not JSON
        raise ConfigError([_env_problem(exc, env)]) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            dotted = ".".join(str(p) for p in loc) or "(root)"
            reason = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                reason = "unknown setting"
            problems.append((dotted, reason, _location(loc, raw, cfg_path, env)))
        raise ConfigError(problems) from None
    return settings


# Where systemd's LoadCredential=NAME looks for a credential (systemd.exec(5)).
SYSTEMD_CREDSTORES = tuple(
    Path(d + enc)
    for d in ("/etc/credstore", "/run/credstore", "/usr/lib/credstore")
    for enc in ("", ".encrypted")
)


def check_startable(settings: Settings, *, credstores: Sequence[Path] = ()) -> None:
    """What `run` needs beyond a valid file: an API key for every real provider enabled.
    `run` calls this before it writes anything (state dir, lock, database, SSH key), and
    check-config calls it too, so that check-config passes exactly what run accepts.
    `credstores`: for check-config outside systemd, the stores a key may wait in for
    LoadCredential= to hand it over. Raises ConfigError."""
    problems = []
    for name, s in settings.providers.enabled().items():
        if name == "sim" or (s.api_key is not None and s.api_key.get_secret_value()):
            continue
        if not any(_exists(d / f"{name}_api_key") for d in credstores):
            problems.append(missing_api_key(name))
    if problems:
        raise ConfigError(problems)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a store we may not look into counts as not holding it
        return False


def missing_api_key(name: str) -> tuple[str, str, str]:
    return (
        f"providers.{name}.api_key",
        f"required when providers.{name}.enabled is true"
        f" (set it or put it in the credential file {name}_api_key)",
        "the configuration",
    )


def read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML table; every way it can be unreadable is a ConfigError naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}: 0x{exc.object[exc.start]:02x}"
        raise ConfigError([("(file)", f"not UTF-8 text ({where})", str(path))]) from None
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read: {exc.strerror}", str(path))]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(file)", f"not valid TOML: {exc}", str(path))]) from None


def _env_problem(exc: SettingsError, env: Mapping[str, str]) -> tuple[str, str, str]:
    m = re.search(r'field "([^"]+)"', str(exc))
    field = m.group(1) if m else "(environment)"
    prefix = "GPUWARDEN_" + field.upper()
    names = sorted(k for k in env if k == prefix or k.startswith(prefix + "__")) or [prefix]
    reason = "not valid JSON (lists and tables in the environment are written as JSON)"
    return field, reason, "environment variable " + ", ".join(names)


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config as JSON-able data, with every secret shown as '**********'."""
    return settings.model_dump(mode="json", by_alias=True)
