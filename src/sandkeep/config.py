"""Every sandkeep setting, its environment variable and its default, in one table.

``SETTINGS`` is the single source of truth: :func:`load_settings` reads it and the README documents
every row (a test checks that). Durations are seconds unless the name says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _env_home() -> Path:
    return Path(os.environ.get("SANDKEEP_HOME", "./.sandkeep"))


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Any
    doc: str


# (attribute, environment variable, default, description)
SETTINGS: tuple[Setting, ...] = (
    Setting("home", "SANDKEEP_HOME", "./.sandkeep", "Base data directory for everything sandkeep keeps."),
    Setting("database_url", "SANDKEEP_DATABASE_URL", None,
            "SQLAlchemy URL of the store; default sqlite:///$SANDKEEP_HOME/sandkeep.db. "
            "PostgreSQL: postgresql+psycopg://user@host:5432/db."),
    Setting("jwt_secret", "SANDKEEP_JWT_SECRET", None,
            "HS256 secret for API tokens; generated into the data dir on first start when unset."),
    Setting("secrets_key", "SANDKEEP_SECRETS_KEY", None,
            "Fernet key that encrypts instance secrets at rest; generated into the data dir when unset."),
    Setting("provider", "SANDKEEP_PROVIDER", "local", "Machine provider: 'local' (built-in host) or 'fly'."),
    Setting("host_url", "SANDKEEP_HOST_URL", None,
            "Machines API base URL of an already running local host (serve starts its own when unset)."),
    Setting("host_token", "SANDKEEP_HOST_TOKEN", None,
            "Bearer token of the local machine host; generated into the host data dir when unset."),
    Setting("host_proxy_url", "SANDKEEP_HOST_PROXY_URL", None,
            "Proxy base URL of the local host (default derived from --host-proxy-listen)."),
    Setting("host_proxy_token", "SANDKEEP_HOST_PROXY_TOKEN", None,
            "Optional token of the local host's proxy: it then refuses requests without it (header "
            "sandkeep-proxy-token); sandkeep sends it with gateway traffic."),
    Setting("host_machine_user", "SANDKEEP_HOST_MACHINE_USER", "nobody",
            "Unprivileged user (name or UID[:GID]) the local host runs machine processes as when it runs as root."),
    Setting("fly_api_token", "FLY_API_TOKEN", None, "Fly.io API token (provider 'fly')."),
    Setting("fly_org", "FLY_ORG", "personal", "Fly.io organization slug that owns the per-owner apps."),
    Setting("fly_regions", "FLY_REGIONS", "iad,ord,dfw", "Comma-separated Fly regions, preferred first."),
    Setting("fly_api_url", "FLY_API_URL", "https://api.machines.dev", "Fly Machines API base URL."),
    Setting("fly_proxy_url", "FLY_PROXY_URL", None,
            "URL template of the Fly proxy for gateway traffic, {app} = app name (default https://{app}.fly.dev)."),
    Setting("app_prefix", "SANDKEEP_APP_PREFIX", "sk", "Prefix of the per-owner provider app names."),
    Setting("app_name_secret", "SANDKEEP_APP_NAME_SECRET", None,
            "HMAC key of the per-owner app names; generated into the data dir (app-name-secret) when unset."),
    Setting("image", "SANDKEEP_IMAGE", "sandkeep/gateway", "Default machine image for new instances."),
    Setting("regions", "SANDKEEP_REGIONS", "lcl-a,lcl-b,lcl-c", "Regions of the local host, preferred first."),
    Setting("default_size", "SANDKEEP_DEFAULT_SIZE", "shared-cpu-1x", "Default machine size of new instances."),
    Setting("volume_size_gb", "SANDKEEP_VOLUME_SIZE_GB", 1, "Size of each instance's volume in GB."),
    Setting("gateway_port", "SANDKEEP_GATEWAY_PORT", 8080, "Port the gateway listens on inside the machine."),
    # engine timings (SPEC §4)
    Setting("interval_running", "SANDKEEP_INTERVAL_RUNNING", 30.0, "Reconcile interval while running."),
    Setting("interval_busy", "SANDKEEP_INTERVAL_BUSY", 5.0,
            "Reconcile interval while starting, restarting, recovering or destroying."),
    Setting("interval_idle", "SANDKEEP_INTERVAL_IDLE", 1800.0, "Reconcile interval while stopped or provisioned."),
    Setting("jitter_fraction", "SANDKEEP_JITTER_FRACTION", 0.10, "Alarm jitter as a fraction of the interval."),
    Setting("unexpected_stop_threshold", "SANDKEEP_UNEXPECTED_STOP_THRESHOLD", 1,
            "Observations of 'stopped' while running before recovery begins."),
    Setting("relocate_failed", "SANDKEEP_RELOCATE_FAILED", False,
            "Also relocate instances whose machine entered 'failed' (default: mark stopped)."),
    Setting("machine_wait_timeout", "SANDKEEP_MACHINE_WAIT_TIMEOUT", 60.0,
            "One provider wait call for a machine to start (the provider caps it at 60 s)."),
    Setting("recovery_timeout", "SANDKEEP_RECOVERY_TIMEOUT", 600.0, "Recovery timeout."),
    Setting("recovery_replacement_starts", "SANDKEEP_RECOVERY_REPLACEMENT_STARTS", 3,
            "Times a recovery starts its replacement machine again when it stopped without being asked to (e.g. "
            "its host restarted), within the recovery timeout; then the recovery fails."),
    Setting("start_timeout", "SANDKEEP_START_TIMEOUT", 300.0, "Soft starting/restarting timeout."),
    Setting("start_hard_timeout", "SANDKEEP_START_HARD_TIMEOUT", 900.0, "Hard starting/restarting timeout."),
    Setting("health_probe_interval", "SANDKEEP_HEALTH_PROBE_INTERVAL", 1.0, "Gateway health probe interval."),
    Setting("health_probe_timeout", "SANDKEEP_HEALTH_PROBE_TIMEOUT", 60.0,
            "Give up probing the gateway after this long (does not block cutover)."),
    Setting("health_fail_threshold", "SANDKEEP_HEALTH_FAIL_THRESHOLD", 3,
            "Failed gateway health probes in a row, while the machine says started, that make a running "
            "instance suspect of a dead host (0: no probe while running)."),
    Setting("dead_host_grace", "SANDKEEP_DEAD_HOST_GRACE", 300.0,
            "How long a suspect instance (host unreachable, gateway silent) waits for its host before it is "
            "relocated (0: at once)."),
    Setting("snapshot_restore_policy", "SANDKEEP_SNAPSHOT_RESTORE_POLICY", "auto",
            "When a dead host makes a fork impossible: 'auto' restores the newest snapshot, 'approve' waits "
            "(visibly) for an admin to approve the data-losing restore."),
    Setting("snapshot_interval", "SANDKEEP_SNAPSHOT_INTERVAL", 3600.0,
            "How often sandkeep takes its own snapshot of every running instance's volume, spread over the fleet "
            "(bounds what a dead host can cost; 0: only the provider's daily snapshots)."),
    Setting("snapshot_retention", "SANDKEEP_SNAPSHOT_RETENTION", 5,
            "Days the provider keeps each snapshot of the volumes sandkeep creates (Fly's volume "
            "snapshot_retention, 1-60; 5 is Fly's default). Sent with every volume create, fork and restore."),
    Setting("orphan_grace", "SANDKEEP_ORPHAN_GRACE", 86400.0,
            "How long a machine or volume of sandkeep's that no record references is reported before it is "
            "deleted (with the ownership check; foreign resources are never touched)."),
    Setting("create_landing_window", "SANDKEEP_CREATE_LANDING_WINDOW", 600.0,
            "After a machine create failed or was abandoned with its outcome unknown, how long every pass of that "
            "instance looks for a machine the provider still made and stops it (at most one started machine)."),
    Setting("inventory_interval", "SANDKEEP_INVENTORY_INTERVAL", 3600.0,
            "How often each engine process lists every app's machines and volumes to find orphans (0 disables)."),
    Setting("inventory_apps_per_pass", "SANDKEEP_INVENTORY_APPS_PER_PASS", 1000,
            "Apps one inventory pass looks at (two list calls each), at most."),
    Setting("inventory_app_pause", "SANDKEEP_INVENTORY_APP_PAUSE", 0.5,
            "Pause between two apps of an inventory pass (keeps it well inside the provider's rate limits)."),
    Setting("retained_volume_retention", "SANDKEEP_RETAINED_VOLUME_RETENTION", 604800.0,
            "How long an old volume with snapshots is kept after recovery (7 days)."),
    Setting("stale_provision_after", "SANDKEEP_STALE_PROVISION_AFTER", 28800.0,
            "Auto-destroy never-started provisions older than this (8 h)."),
    Setting("destroy_volume_attempts", "SANDKEEP_DESTROY_VOLUME_ATTEMPTS", 50,
            "Volume delete attempts before giving up loudly."),
    Setting("lease_ttl", "SANDKEEP_LEASE_TTL", 30.0, "How long a worker's claim on an instance lasts."),
    Setting("alarm_poll_interval", "SANDKEEP_ALARM_POLL_INTERVAL", 1.0, "How often the engine looks for due alarms."),
    Setting("detect_poll_interval", "SANDKEEP_DETECT_POLL_INTERVAL", 2.0,
            "How often the detector lists machines per app to notice stops early (0 disables)."),
    Setting("heartbeat_url", "SANDKEEP_HEARTBEAT_URL", None,
            "Base URL machines' gateways send heartbeats to (POST <url>/v1/gateway/heartbeat); default "
            "SANDKEEP_PUBLIC_URL, else http://<listen>. 'off' disables beats (detection then lists per app)."),
    Setting("heartbeat_interval", "SANDKEEP_HEARTBEAT_INTERVAL", 10.0,
            "How often a machine's gateway beats (one line on its heartbeat stream); 0 disables beats."),
    Setting("heartbeat_timeout", "SANDKEEP_HEARTBEAT_TIMEOUT", 25.0,
            "A running instance that beat before and is silent this long gets one targeted machine read "
            "(stopped or gone: woken for recovery)."),
    Setting("heartbeat_flush_interval", "SANDKEEP_HEARTBEAT_FLUSH_INTERVAL", 1.0,
            "How often the beats a process received are written to the database (one batch)."),
    Setting("heartbeat_check_interval", "SANDKEEP_HEARTBEAT_CHECK_INTERVAL", 1.0,
            "How often an engine looks for instances whose beats stopped (one indexed query)."),
    Setting("heartbeat_auth_recheck", "SANDKEEP_HEARTBEAT_AUTH_RECHECK", 2.0,
            "A heartbeat with a token other than the cached one re-reads the instance's token at most this "
            "often per instance id (wrong or unknown tokens cost no database read in between)."),
    Setting("detect_backstop_rate", "SANDKEEP_DETECT_BACKSTOP_RATE", 0.0,
            "With heartbeats on: list calls per second of the per-app backstop listing (0: a quarter of "
            "SANDKEEP_PROVIDER_RATE_LIMIT, or 10/s without a rate limit)."),
    Setting("engine_concurrency", "SANDKEEP_ENGINE_CONCURRENCY", 64,
            "Instances reconciled at once per process (alarms and wake-ups share these slots)."),
    Setting("alarm_coalesce", "SANDKEEP_ALARM_COALESCE", 0.2,
            "The engine waits at least this long for the next alarm, claiming alarms due meanwhile together "
            "(adds at most this much alarm lag; saves CPU and database writes)."),
    Setting("engine_heartbeat_interval", "SANDKEEP_ENGINE_HEARTBEAT_INTERVAL", 1.0,
            "How often an engine process beats in the database (and voids dead engines' leases)."),
    Setting("engine_heartbeat_ttl", "SANDKEEP_ENGINE_HEARTBEAT_TTL", 5.0,
            "An engine silent this long is dead: its leases are voided and its instances picked up."),
    Setting("gauge_refresh_interval", "SANDKEEP_GAUGE_REFRESH_INTERVAL", 5.0,
            "How often an engine refreshes the instance-count and operations gauges from the database."),
    Setting("provider_rate_limit", "SANDKEEP_PROVIDER_RATE_LIMIT", 0.0,
            "Machines API requests per second for the whole process (token bucket; 0: unlimited). A 429's "
            "Retry-After pauses every caller."),
    Setting("provider_rate_burst", "SANDKEEP_PROVIDER_RATE_BURST", 0.0,
            "Token bucket burst (0: one second's worth of the rate limit)."),
    Setting("provider_region_concurrency", "SANDKEEP_PROVIDER_REGION_CONCURRENCY", 16,
            "Creates (volume fork/create, machine create) in flight per region at most (0: no cap)."),
    Setting("provider_breaker_threshold", "SANDKEEP_PROVIDER_BREAKER_THRESHOLD", 0,
            "Consecutive failed creates in a region that open its circuit breaker (0: no breaker; 5 on Fly)."),
    Setting("provider_breaker_cooldown", "SANDKEEP_PROVIDER_BREAKER_COOLDOWN", 30.0,
            "How long an open region breaker refuses creates before one trial create."),
    Setting("role", "SANDKEEP_ROLE", "all",
            "What `sandkeep serve` runs: all (API + engine), api (never reconciles) or engine."),
    Setting("provider_backoff_max", "SANDKEEP_PROVIDER_BACKOFF_MAX", 300.0,
            "Longest alarm backoff after consecutive transient provider errors (starts at the busy interval)."),
    Setting("claim_wait", "SANDKEEP_CLAIM_WAIT", 5.0,
            "How long an API action or a wake-up waits for another worker's claim on an instance."),
    Setting("log_level", "SANDKEEP_LOG_LEVEL", "info", "Log level: debug, info, warning, error."),
    # serve, API and CLI
    Setting("listen", "SANDKEEP_LISTEN", "127.0.0.1:8080", "Address `sandkeep serve` listens on (HOST:PORT)."),
    Setting("public_url", "SANDKEEP_PUBLIC_URL", None,
            "Base URL users reach the API and web UI at (printed links); default http://<listen>."),
    Setting("host_listen", "SANDKEEP_HOST_LISTEN", "127.0.0.1:4280",
            "Machines API address of the local host that serve starts (HOST:PORT)."),
    Setting("host_proxy_listen", "SANDKEEP_HOST_PROXY_LISTEN", "127.0.0.1:4281",
            "Proxy address of the local host that serve starts (HOST:PORT)."),
    Setting("host_start_timeout", "SANDKEEP_HOST_START_TIMEOUT", 30.0,
            "How long serve waits for its local host child to answer /healthz."),
    Setting("host_machines", "SANDKEEP_HOST_MACHINES", "process",
            "How the local host runs machines: 'process' (a real OS process each) or 'sim' (simulated, no "
            "process: thousands of instances on a laptop). Read by `sandkeep host` and serve's host child."),
    Setting("host_hosts_per_region", "SANDKEEP_HOST_HOSTS_PER_REGION", 3,
            "Hosts (Fly zones) in each region of the local host; a volume and its machine live on one."),
    Setting("host_profile", "SANDKEEP_HOST_PROFILE", "none",
            "Delay profile of the local host serve starts: 'none' or 'realistic' (Fly-like create, fork, boot)."),
    Setting("host_rate_limits", "SANDKEEP_HOST_RATE_LIMITS", False,
            "Whether the local host serve starts enforces Fly's Machines API rate limits (429 + Retry-After)."),
    Setting("ready_timeout", "SANDKEEP_READY_TIMEOUT", 5.0,
            "How long /readyz waits for the database and for the machine provider, each."),
    Setting("provider_check_timeout", "SANDKEEP_PROVIDER_CHECK_TIMEOUT", 15.0,
            "How long serve --provider fly waits for each start-up check of the token, org and regions."),
    Setting("gateway_proxy_timeout", "SANDKEEP_GATEWAY_PROXY_TIMEOUT", 60.0,
            "Timeout of one request proxied by the API to an instance's gateway."),
    Setting("token_ttl", "SANDKEEP_TOKEN_TTL", 2592000.0,
            "Lifetime of tokens printed by `sandkeep token` (30 days; 0 = no expiry)."),
    Setting("api_url", "SANDKEEP_URL", "http://127.0.0.1:8080", "API base URL the CLI talks to."),
    Setting("api_token", "SANDKEEP_TOKEN", None, "API token the CLI sends (see `sandkeep token`)."),
    # web UI
    Setting("web_session_ttl", "SANDKEEP_WEB_SESSION_TTL", 43200.0,
            "How long a web sign-in session lasts (never longer than the pasted token)."),
    Setting("web_login_code_ttl", "SANDKEEP_WEB_LOGIN_CODE_TTL", 900.0,
            "How long a one-time sign-in link printed by serve stays valid."),
    Setting("web_poll_interval", "SANDKEEP_WEB_POLL_INTERVAL", 2.0,
            "How often the web pages refresh instance status without a reload."),
    Setting("web_gateway_timeout", "SANDKEEP_WEB_GATEWAY_TIMEOUT", 30.0,
            "Timeout of one request the web UI's Open link proxies to an instance's gateway."),
    # credentials and limits
    Setting("signin_max_failures", "SANDKEEP_SIGNIN_MAX_FAILURES", 10,
            "Failed web sign-ins (token paste, one-time code) per client address before 429 (0 = no limit)."),
    Setting("signin_failure_window", "SANDKEEP_SIGNIN_FAILURE_WINDOW", 300.0,
            "Window in which failed sign-ins are counted; also the longest Retry-After."),
    Setting("max_instances_per_user", "SANDKEEP_MAX_INSTANCES_PER_USER", 10,
            "Instances (not destroyed) one user may own; 0 = unlimited; admins are exempt."),
    Setting("allowed_images", "SANDKEEP_ALLOWED_IMAGES", None,
            "Comma-separated images instances may use (default: only SANDKEEP_IMAGE)."),
    Setting("user_machine_sizes", "SANDKEEP_USER_MACHINE_SIZES",
            "shared-cpu-1x,shared-cpu-2x,shared-cpu-4x,shared-cpu-8x",
            "Comma-separated machine sizes non-admins may pick (admins: every size)."),
    Setting("max_labels", "SANDKEEP_MAX_LABELS", 16, "Labels one instance may carry."),
    Setting("guest_cpu_kinds", "SANDKEEP_GUEST_CPU_KINDS", "shared",
            "Comma-separated guest CPU kinds non-admins may pick (shared, performance; admins: both)."),
    Setting("guest_max_cpus", "SANDKEEP_GUEST_MAX_CPUS", 8, "Most guest CPUs a non-admin may pick."),
    Setting("guest_max_memory_mb", "SANDKEEP_GUEST_MAX_MEMORY_MB", 2048,
            "Most guest memory (MB) a non-admin may pick."),
    Setting("audit_refused_max", "SANDKEEP_AUDIT_REFUSED_MAX", 20,
            "Refused admin calls audited per actor per window; more are counted into the next row."),
    Setting("audit_refused_window", "SANDKEEP_AUDIT_REFUSED_WINDOW", 3600.0,
            "Window of SANDKEEP_AUDIT_REFUSED_MAX."),
)


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_env_home)
    database_url: str | None = None
    jwt_secret: str | None = None
    secrets_key: str | None = None
    provider: str = "local"
    host_url: str | None = None
    host_token: str | None = None
    host_proxy_url: str | None = None
    host_proxy_token: str | None = None
    host_machine_user: str = "nobody"
    fly_api_token: str | None = None
    fly_org: str = "personal"
    fly_regions: str = "iad,ord,dfw"
    fly_api_url: str = "https://api.machines.dev"
    fly_proxy_url: str | None = None
    app_prefix: str = "sk"
    app_name_secret: str | None = None
    image: str = "sandkeep/gateway"
    regions: str = "lcl-a,lcl-b,lcl-c"
    default_size: str = "shared-cpu-1x"
    volume_size_gb: int = 1
    gateway_port: int = 8080
    interval_running: float = 30.0
    interval_busy: float = 5.0
    interval_idle: float = 1800.0
    jitter_fraction: float = 0.10
    unexpected_stop_threshold: int = 1
    relocate_failed: bool = False
    machine_wait_timeout: float = 60.0
    recovery_timeout: float = 600.0
    recovery_replacement_starts: int = 3
    start_timeout: float = 300.0
    start_hard_timeout: float = 900.0
    health_probe_interval: float = 1.0
    health_probe_timeout: float = 60.0
    health_fail_threshold: int = 3
    dead_host_grace: float = 300.0
    snapshot_restore_policy: str = "auto"
    snapshot_interval: float = 3600.0
    snapshot_retention: int = 5
    orphan_grace: float = 86400.0
    create_landing_window: float = 600.0
    inventory_interval: float = 3600.0
    inventory_apps_per_pass: int = 1000
    inventory_app_pause: float = 0.5
    retained_volume_retention: float = 604800.0
    stale_provision_after: float = 28800.0
    destroy_volume_attempts: int = 50
    lease_ttl: float = 30.0
    alarm_poll_interval: float = 1.0
    detect_poll_interval: float = 2.0
    heartbeat_url: str | None = None
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 25.0
    heartbeat_flush_interval: float = 1.0
    heartbeat_check_interval: float = 1.0
    heartbeat_auth_recheck: float = 2.0
    detect_backstop_rate: float = 0.0
    engine_concurrency: int = 64
    alarm_coalesce: float = 0.2
    engine_heartbeat_interval: float = 1.0
    engine_heartbeat_ttl: float = 5.0
    gauge_refresh_interval: float = 5.0
    provider_rate_limit: float = 0.0
    provider_rate_burst: float = 0.0
    provider_region_concurrency: int = 16
    provider_breaker_threshold: int = 0
    provider_breaker_cooldown: float = 30.0
    role: str = "all"
    provider_backoff_max: float = 300.0
    claim_wait: float = 5.0
    log_level: str = "info"
    listen: str = "127.0.0.1:8080"
    public_url: str | None = None
    host_listen: str = "127.0.0.1:4280"
    host_proxy_listen: str = "127.0.0.1:4281"
    host_start_timeout: float = 30.0
    host_machines: str = "process"
    host_hosts_per_region: int = 3
    host_profile: str = "none"
    host_rate_limits: bool = False
    ready_timeout: float = 5.0
    provider_check_timeout: float = 15.0
    gateway_proxy_timeout: float = 60.0
    token_ttl: float = 2592000.0
    api_url: str = "http://127.0.0.1:8080"
    api_token: str | None = None
    web_session_ttl: float = 43200.0
    web_login_code_ttl: float = 900.0
    web_poll_interval: float = 2.0
    web_gateway_timeout: float = 30.0
    signin_max_failures: int = 10
    signin_failure_window: float = 300.0
    max_instances_per_user: int = 10
    allowed_images: str | None = None
    user_machine_sizes: str = "shared-cpu-1x,shared-cpu-2x,shared-cpu-4x,shared-cpu-8x"
    max_labels: int = 16
    guest_cpu_kinds: str = "shared"
    guest_max_cpus: int = 8
    guest_max_memory_mb: int = 2048
    audit_refused_max: int = 20
    audit_refused_window: float = 3600.0

    @property
    def region_list(self) -> list[str]:
        raw = self.fly_regions if self.provider == "fly" else self.regions
        return [r.strip() for r in raw.split(",") if r.strip()]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'sandkeep.db').resolve()}"

    def replace(self, **changes: Any) -> Settings:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Settings(**current)


class SettingsError(ValueError):
    """A setting's environment value cannot be parsed."""


def _parse(raw: str, default: Any, env: str) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{env} must be true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError as exc:
            raise SettingsError(f"{env} must be a whole number, got {raw!r}") from exc
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError as exc:
            raise SettingsError(f"{env} must be a number of seconds, got {raw!r}") from exc
        if value < 0:
            raise SettingsError(f"{env} must not be negative, got {raw!r}")
        return value
    return raw


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment (or ``environ``), then explicit ``overrides`` (None = keep)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw is None or raw == "":
            continue
        values[s.name] = Path(raw) if s.name == "home" else _parse(raw, s.default, s.env)
    for key, value in overrides.items():
        if value is not None:
            values[key] = Path(value) if key == "home" else value
    return Settings(**values)
