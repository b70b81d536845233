"""config.toml: parsed with tomllib, validated by msgspec into immutable typed objects.

Every key has a built-in default (the same values the documented `config.toml` shows), so cardq runs with no
file at all. A bad file is refused with one line naming the key, the value and what is expected — the caller
turns `ConfigError` into exit code 2.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import Meta

from cardq.errors import ConfigError

PositiveInt = Annotated[int, Meta(ge=1)]
PositiveFloat = Annotated[float, Meta(gt=0)]

CONFIG_ENV = "CARDQ_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"
HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
LOG_LEVELS = ("debug", "info", "warning", "error")
PLAN_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class StoreConfig(_Section):
    path: str = "./cardq.db"
    synchronous: str = "normal"
    busy_timeout_ms: Annotated[int, Meta(ge=0, le=600_000)] = 5000
    busy_retries: Annotated[int, Meta(ge=1, le=100)] = 6


class WorkersConfig(_Section):
    count: Annotated[int, Meta(ge=0, le=256)] = 3
    handler: str = "cardq.cards:make_card"
    job_timeout_s: PositiveFloat = 300.0
    lease_s: PositiveFloat = 30.0
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 5
    backoff_base_s: Annotated[float, Meta(ge=0)] = 2.0
    backoff_max_s: Annotated[float, Meta(ge=0)] = 300.0
    prefetch: Annotated[int, Meta(ge=1, le=1000)] | Literal["auto"] = "auto"
    gate: str = "generation"
    gate_by_kind: dict[str, str] = msgspec.field(default_factory=dict)


class SupervisorConfig(_Section):
    max_restarts: Annotated[int, Meta(ge=1)] = 10
    max_seconds: PositiveFloat = 60.0
    restart_backoff_max_s: Annotated[float, Meta(ge=0)] = 5.0
    shutdown_timeout_s: Annotated[float, Meta(ge=0)] = 30.0
    timeout_grace_s: Annotated[float, Meta(ge=0)] = 5.0
    poison_kills: Annotated[int, Meta(ge=1)] = 3
    recover_interval_s: PositiveFloat = 10.0


class ActorsConfig(_Section):
    run_dir: str = "./run"
    ask_timeout_ms: Annotated[int, Meta(ge=1, le=600_000)] = 2000
    counter_shards: Annotated[int, Meta(ge=0, le=64)] = 1
    ratelimit_shards: Annotated[int, Meta(ge=0, le=64)] = 1
    paths_shards: Annotated[int, Meta(ge=0, le=64)] = 1
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_connections: Annotated[int, Meta(ge=8, le=1_000_000)] = 4000


class RatePolicy(_Section):
    limit: PositiveInt
    window_s: PositiveFloat
    burst: Annotated[int, Meta(ge=0)] = 0  # 0: the limit


class RateLimitConfig(_Section):
    default_limit: PositiveInt = 60
    default_window_s: PositiveFloat = 60.0
    default_burst: Annotated[int, Meta(ge=0)] = 0  # 0: the limit
    policies: dict[str, RatePolicy] = msgspec.field(default_factory=dict)


class GateConfig(_Section):
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 4
    adaptive: bool = False  # the limit follows the upstream between min_ and max_concurrency (actors/gatelimit.py)
    min_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 1
    max_queue: Annotated[int, Meta(ge=0, le=1_000_000)] = 64
    queue_timeout_ms: Annotated[int, Meta(ge=0, le=3_600_000)] = 12000


def _default_gates() -> dict[str, GateConfig]:
    return {"generation": GateConfig()}


class PathsConfig(_Section):
    enabled: bool = True
    sampling_rate: Annotated[float, Meta(gt=0, le=1)] = 1.0
    max_batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 100
    max_batch_wait_ms: Annotated[int, Meta(ge=0, le=60_000)] = 50
    max_paths_per_hour: Annotated[int, Meta(ge=1)] = 1000
    retention_days: Annotated[float, Meta(gt=0)] = 3.0
    id_rules: list[list[str]] = msgspec.field(default_factory=lambda: [
        ["^[0-9]+$", ":id"],
        ["^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", ":uuid"],
        ["^[0-9a-fA-F]{16,}$", ":hex"],
    ])


class LogConfig(_Section):
    level: str = "info"
    format: str = "auto"
    file: str = ""


class CardsConfig(_Section):
    simulate_latency_ms: Annotated[float, Meta(ge=0)] = 0.0
    failure_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0


class UpstreamConfig(_Section):
    base_url: str = ""  # an OpenAI-compatible API, e.g. "https://api.openai.com/v1"; "" = none configured
    model: str = ""
    api_key_env: str = "CARDQ_UPSTREAM_API_KEY"  # the NAME of the environment variable holding the key
    request_timeout_ms: Annotated[int, Meta(ge=100, le=600_000)] = 12000
    max_tokens: Annotated[int, Meta(ge=16, le=100_000)] = 800
    prompts_dir: str = ""  # <marketplace>.<style>.txt (or default.txt) next to config.toml; "" = built-in


def _default_daily() -> dict[str, int]:
    return {"free": 5, "basic": 20, "professional": 100, "enterprise": 1000}


class LimitsConfig(_Section):
    batch_max_items_per_request: PositiveInt = 200
    batch_max_queued_per_user: PositiveInt = 300
    job_processing_timeout_seconds: PositiveInt = 1800
    max_payload_bytes: Annotated[int, Meta(ge=2, le=64 * 1024 * 1024)] = 65536
    timezone: str = "UTC"
    daily: dict[str, int] = msgspec.field(default_factory=_default_daily)


class HttpConfig(_Section):
    enabled: bool = True  # the HTTP API, /metrics and the status page (cardq/web/), one more permanent child
    listen: str = "127.0.0.1:8787"  # host:port ("[::1]:8787"; port 0: any free one), or a unix socket path
    tls_cert: str = ""  # PEM files; required to listen beyond loopback unless allow_plain_remote = true
    tls_key: str = ""
    allow_plain_remote: bool = False
    max_body_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    header_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0  # a request's headers, from its first byte
    keepalive_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0  # an idle keep-alive connection is closed after
    body_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0  # a request's body, once its headers are in
    max_waits: Annotated[int, Meta(ge=1, le=100_000)] = 256  # long polls (GET /v1/jobs/{id}/wait) at once
    threads: Annotated[int, Meta(ge=1, le=1024)] = 16  # for the blocking calls (database, actors)
    max_events_per_request: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    gate_lease_s: Annotated[float, Meta(gt=0, le=86_400)] = 30.0  # an HTTP permit expires unless renewed
    max_gate_leases: Annotated[int, Meta(ge=1, le=100_000)] = 256


class MetricsConfig(_Section):
    max_kinds: Annotated[int, Meta(ge=1, le=10_000)] = 50  # job kinds counted by name; later ones as "(other)"


class Config(_Section):
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cards: CardsConfig = msgspec.field(default_factory=CardsConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    actors: ActorsConfig = msgspec.field(default_factory=ActorsConfig)
    ratelimit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    gates: dict[str, GateConfig] = msgspec.field(default_factory=_default_gates)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)


def resolve_path(configured: str, config_dir: Path | None) -> Path:
    """A path from config.toml; a relative one is relative to the config file's folder (else the cwd)."""
    p = Path(configured).expanduser()
    if p.is_absolute():
        return p
    return ((config_dir or Path.cwd()) / p).resolve()


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus where it came from, so an operator can always tell which config is in effect."""

    config: Config
    path: Path | None  # None: built-in defaults, no file
    digest: str  # short sha256 of the file's bytes ("builtin" without a file)
    explicit: frozenset[str] = frozenset()  # dotted keys the file sets (the rest are built-in defaults)
    raw: bytes = b""  # the file's bytes, as validated (what a reload hands to the children)

    # Resolved once per loaded config (a resolve walks the path with lstat calls: ~25 µs, and a submit asks for
    # run_dir to ring the supervisor). A relative path with no config file is relative to the working directory
    # at the first use.
    @functools.cached_property
    def db_path(self) -> Path:
        return resolve_path(self.config.store.path, self.config_dir)

    @functools.cached_property
    def run_dir(self) -> Path:
        """Actors' sockets and the key file."""
        return resolve_path(self.config.actors.run_dir, self.config_dir)

    @property
    def config_dir(self) -> Path | None:
        """The config file's folder (None: no file); relative paths in it are relative to this."""
        return self.path.parent if self.path is not None else None

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "built-in defaults"

    def limit_values(self) -> Mapping[str, tuple[int, str]]:
        """Each limit key → (value, "config" if the file sets it else "default"), for store.limits. Computed once
        per loaded config (a submit asks for it every time); read-only."""
        return self._limit_values

    @functools.cached_property
    def _limit_values(self) -> Mapping[str, tuple[int, str]]:
        lim = self.config.limits
        values = {key: getattr(lim, key) for key in LIMIT_SCALAR_KEYS}
        values.update({f"daily.{plan}": n for plan, n in lim.daily.items()})
        return {
            key: (value, "config" if f"limits.{key}" in self.explicit else "default")
            for key, value in values.items()
        }


LIMIT_SCALAR_KEYS = (
    "batch_max_items_per_request",
    "batch_max_queued_per_user",
    "job_processing_timeout_seconds",
    "max_payload_bytes",
)


def resolve_config_path(explicit: str | os.PathLike | None) -> Path | None:
    """--config (or CARDQ_CONFIG, which click folds into it) wins; else ./config.toml if present; else None."""
    if explicit:
        return Path(explicit)
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


def load_config(path: str | os.PathLike | None) -> LoadedConfig:
    """Read and validate `path` (None → built-in defaults). Raises ConfigError with a one-line reason."""
    if path is None:
        return LoadedConfig(Config(), None, "builtin")
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found; pass an existing --config or run `cardq init`") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    cfg, raw = _parse(data, str(p))
    return LoadedConfig(cfg, p, hashlib.sha256(data).hexdigest()[:12], frozenset(_dotted_keys(raw)), data)


def load_config_for_reading(path: str | os.PathLike | None) -> tuple[LoadedConfig, str | None]:
    """For read-only commands (status): a file that is valid TOML but breaks a rule still names the database,
    and the operator most needs `cardq status` exactly when the file on disk is broken. Returns the config
    (built-in defaults but for store.path, if the file is invalid) and the file's error, if any."""
    try:
        return load_config(path), None
    except ConfigError as e:
        if path is None:
            raise
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            # Not even TOML: the running supervisor's record says which database it uses.
            running = read_running_record(Path(path))
            if running is None:
                raise e from None
            store = StoreConfig(path=running["database"])
            return LoadedConfig(Config(store=store), Path(path), "invalid"), str(e)
        store_path = raw.get("store", {}).get("path") if isinstance(raw.get("store"), dict) else None
        store = StoreConfig(path=store_path) if isinstance(store_path, str) else StoreConfig()
        return LoadedConfig(Config(store=store), Path(path), "invalid"), str(e)


def running_record_path(config_path: Path) -> Path:
    """Beside config.toml, the running supervisor's record of what it runs (its database, pid, config digest):
    found without parsing config.toml, so status, stop and reload work while the file is broken."""
    return config_path.with_name(config_path.name + ".running")


def read_running_record(config_path: Path) -> dict[str, Any] | None:
    try:
        record = orjson.loads(running_record_path(config_path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("database"), str) else None


def parse_config(data: bytes, name: str = "config.toml") -> Config:
    return _parse(data, name)[0]


def _dotted_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_dotted_keys(v, prefix + k + "."))
    return keys


def _parse(data: bytes, name: str) -> tuple[Config, dict[str, Any]]:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte {e.start}); expected a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: invalid TOML: {e}") from None
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(name, raw, str(e))) from None
    # [limits.daily] adds plans to (or changes) the built-in ones, like every other key: a missing one keeps its
    # default. Set a plan to 0 to refuse its jobs.
    daily = {**_default_daily(), **cfg.limits.daily}
    cfg = msgspec.structs.replace(cfg, limits=msgspec.structs.replace(cfg.limits, daily=daily),
                                  gates={**_default_gates(), **cfg.gates})  # same rule for the built-in gate
    _check_semantics(name, cfg)
    return cfg, raw


def _explain(name: str, raw: dict[str, Any], msg: str) -> str:
    """Turn msgspec's 'Expected `int`, got `str` - at `$.workers.count`' into 'key = value: expected …'."""
    reason, _, where = msg.partition(" - at `$")
    keys = [k for k in where.rstrip("`").split(".") if k] if where else []
    unknown = re.match(r"Object contains unknown field `([^`]+)`", reason)
    if unknown:
        section = _lookup_struct(keys)
        dotted = ".".join([*keys, unknown.group(1)])
        allowed = ", ".join(section.__struct_fields__) if section else "?"
        return f"{name}: unknown key {dotted}; expected one of: {allowed}"
    value = _lookup(raw, keys)
    for msgspec_name, toml_name in _TOML_TYPES.items():
        reason = reason.replace(msgspec_name, toml_name)
    return f"{name}: {'.'.join(keys)} = {_toml_repr(value)}: {reason[0].lower()}{reason[1:]}"


# msgspec speaks JSON; the user wrote TOML.
_TOML_TYPES = {"`object`": "a table", "`array`": "an array", "`str`": "a string", "`int`": "an integer",
               "`float`": "a number", "`bool`": "a boolean"}


def _lookup_struct(keys: list[str]) -> type[msgspec.Struct] | None:
    typ: Any = Config
    for k in keys:
        hints = {f.name: f.type for f in msgspec.structs.fields(typ)} if isinstance(typ, type) else {}
        typ = hints.get(k)
        if typ is None:
            return None
    return typ if isinstance(typ, type) and issubclass(typ, msgspec.Struct) else None


def _lookup(raw: Any, keys: list[str]) -> Any:
    for k in keys:
        if isinstance(raw, dict) and k in raw:
            raw = raw[k]
        else:
            return None
    return raw


def _toml_repr(value: Any) -> str:
    """A value as the user would write it, on one line (newlines and quotes escaped)."""
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _check_semantics(name: str, cfg: Config) -> None:
    """Rules msgspec's per-field constraints cannot express."""
    w, lim = cfg.workers, cfg.limits
    if cfg.log.level not in LOG_LEVELS:
        raise ConfigError(f"{name}: log.level = {_toml_repr(cfg.log.level)}: expected one of {', '.join(LOG_LEVELS)}")
    if cfg.log.format not in ("auto", "json", "console"):
        raise ConfigError(f'{name}: log.format = {_toml_repr(cfg.log.format)}: expected "auto", "json" or "console"')
    if cfg.store.synchronous not in ("normal", "full"):
        raise ConfigError(
            f'{name}: store.synchronous = {_toml_repr(cfg.store.synchronous)}: expected "normal" or "full"')
    if not HANDLER_RE.match(w.handler):
        raise ConfigError(f'{name}: workers.handler = {_toml_repr(w.handler)}: expected "module:function"')
    if w.backoff_max_s < w.backoff_base_s:
        raise ConfigError(
            f"{name}: workers.backoff_max_s = {w.backoff_max_s}: expected >= workers.backoff_base_s "
            f"({w.backoff_base_s})"
        )
    try:
        zoneinfo.ZoneInfo(lim.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f'{name}: limits.timezone = {_toml_repr(lim.timezone)}: expected an IANA time zone such as "UTC" or '
            '"Europe/Moscow"'
        ) from None
    for gate in [w.gate, *w.gate_by_kind.values()]:
        if gate and gate not in cfg.gates:
            raise ConfigError(f"{name}: workers gate {_toml_repr(gate)}: no [gates.{gate}] section; expected one of: "
                              f"{', '.join(cfg.gates) or '(none)'} or \"\" for no gate")
    for gate_name, g in cfg.gates.items():
        if g.adaptive and g.min_concurrency > g.max_concurrency:
            raise ConfigError(f"{name}: gates.{gate_name}.min_concurrency = {g.min_concurrency}: expected <= "
                              f"max_concurrency ({g.max_concurrency}), the most an adaptive gate may grow to")
    up = cfg.upstream
    if up.base_url and not re.match(r"^https?://[^/\s]+", up.base_url):
        raise ConfigError(f"{name}: upstream.base_url = {_toml_repr(up.base_url)}: expected an http:// or https:// "
                          'URL of an OpenAI-compatible API, such as "https://api.openai.com/v1"')
    if up.base_url and not up.model:
        raise ConfigError(f'{name}: upstream.model = "": expected the model to ask, with upstream.base_url set')
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", up.api_key_env):
        raise ConfigError(f"{name}: upstream.api_key_env = {_toml_repr(up.api_key_env)}: expected the NAME of an "
                          "environment variable (the key itself never goes in config.toml)")
    _check_http(name, cfg.http)
    for n, rule in enumerate(cfg.paths.id_rules):
        try:
            if len(rule) != 2:
                raise ValueError("expected [pattern, replacement]")
            re.compile(rule[0])
        except (re.error, ValueError) as e:
            raise ConfigError(f"{name}: paths.id_rules[{n}] = {_toml_repr(rule)}: {e}") from None
    for pattern in cfg.ratelimit.policies:
        if not pattern:
            raise ConfigError(f'{name}: ratelimit.policies."": expected a key pattern such as "user:*"')
    for plan in lim.daily:
        if not PLAN_RE.match(plan):
            raise ConfigError(
                f"{name}: limits.daily.{_toml_repr(plan)}: expected a plan name of lowercase letters, digits and _"
            )
        if lim.daily[plan] < 0:
            raise ConfigError(f"{name}: limits.daily.{plan} = {lim.daily[plan]}: expected an integer >= 0")


def parse_listen(listen: str) -> tuple[str, int] | str:
    """[http] listen: (host, port), or a unix socket path; ValueError saying what is expected."""
    if listen.startswith(("/", "./", "../", "~")) or listen.endswith(".sock"):
        return listen
    m = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$", listen)
    if not m or int(m.group(2)) > 65535:
        raise ValueError('expected "host:port" (such as "127.0.0.1:8787" or "[::1]:8787") or a unix socket path')
    return m.group(1).strip("[]"), int(m.group(2))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http(name: str, h: HttpConfig) -> None:
    try:
        where = parse_listen(h.listen)
    except ValueError as e:
        raise ConfigError(f"{name}: http.listen = {_toml_repr(h.listen)}: {e}") from None
    if bool(h.tls_cert) != bool(h.tls_key):
        raise ConfigError(f"{name}: http.tls_cert and http.tls_key: expected both (PEM files) or neither")
    if isinstance(where, tuple) and not is_loopback(where[0]) and not h.tls_cert and not h.allow_plain_remote:
        raise ConfigError(
            f"{name}: http.listen = {_toml_repr(h.listen)}: beyond loopback, bearer tokens would cross the network "
            "in clear; expected http.tls_cert and http.tls_key, or http.allow_plain_remote = true (behind a "
            "TLS-terminating proxy)")
