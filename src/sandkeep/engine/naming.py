"""Names, ids, machine sizes and the machine configuration built from an instance record.

* instance id ``ins_<16 hex>``, sandbox id ``sbx_<16 hex>``;
* provider app per owner: ``{app_prefix}-{first 12 hex of HMAC-SHA256(server secret, user_id)}`` (a valid
  Fly app name: lowercase letters, digits and dashes, starting with a letter — the prefix is normalised to
  that); without the server secret nobody can derive a user's app (and public hostname) from the user id;
* volume name: the instance id with ``_`` (Fly volume names allow letters, digits and underscores; forks keep
  the name, SPEC §7.2);
* machine name: the instance id for the first machine, ``<instance id>-r<n>`` for a recovery replacement.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _pysecrets
from collections.abc import Mapping

from sandkeep.gateway import TOKEN_ENV as GATEWAY_TOKEN_ENV
from sandkeep.provider.models import Guest, MachineConfig, Mount
from sandkeep.store.records import InstanceRecord

#: Fly's machine size presets (https://fly.io/docs/about/pricing/#compute): name -> guest.
SIZES: dict[str, Guest] = {
    "shared-cpu-1x": Guest(cpu_kind="shared", cpus=1, memory_mb=256),
    "shared-cpu-2x": Guest(cpu_kind="shared", cpus=2, memory_mb=512),
    "shared-cpu-4x": Guest(cpu_kind="shared", cpus=4, memory_mb=1024),
    "shared-cpu-8x": Guest(cpu_kind="shared", cpus=8, memory_mb=2048),
    "performance-1x": Guest(cpu_kind="performance", cpus=1, memory_mb=2048),
    "performance-2x": Guest(cpu_kind="performance", cpus=2, memory_mb=4096),
    "performance-4x": Guest(cpu_kind="performance", cpus=4, memory_mb=8192),
    "performance-8x": Guest(cpu_kind="performance", cpus=8, memory_mb=16384),
}

METADATA_SANDBOX = "sandbox_id"
METADATA_USER = "user_id"
METADATA_INSTANCE = "instance_id"
METADATA_GENERATION = "config_generation"

VOLUME_MOUNT_PATH = "/data"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# --- env and secret names a user may not set (SPEC §13): the one list, checked for every provider ----------
#: Exact names: variables the machine host sets itself, and variables that make a shell, the dynamic loader
#: or an interpreter run code or load libraries of the caller's choosing when a process starts.
FORBIDDEN_ENV_NAMES = frozenset({
    "PORT", "HOME", "PATH", "IFS", "CDPATH", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "PS4",
    "PROMPT_COMMAND", "NODE_OPTIONS", "NODE_PATH", "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT",
    "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "GCONV_PATH", "NLSPATH",
    "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "OPENSSL_CONF", "OPENSSL_ENGINES", "LUA_INIT", "LUA_PATH",
    "LUA_CPATH", "TCLLIBPATH", "PHPRC", "PHP_INI_SCAN_DIR", "DOTNET_STARTUP_HOOKS", "GIT_EXEC_PATH", "TMPDIR",
})
#: Name prefixes: the dynamic loaders (glibc ``LD_*``, macOS ``DYLD_*``, ``GLIBC_TUNABLES``, ``MALLOC_*``),
#: Python (``PYTHON*``: PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, …), exported bash functions, .NET profilers,
#: and the names the provider and sandkeep own (``FLY_*``, ``SANDKEEP_*``).
FORBIDDEN_ENV_PREFIXES = ("LD_", "DYLD_", "GLIBC_", "MALLOC_", "PYTHON", "BASH_FUNC_", "CORECLR_", "COR_",
                          "FLY_", "SANDKEEP_")
#: Name suffixes: any ``*_PRELOAD`` (LD_PRELOAD, and the same idea in other runtimes).
FORBIDDEN_ENV_SUFFIXES = ("_PRELOAD",)
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_ENTRIES = 200
MAX_IMAGE_LEN = 256
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


class ConfigError(ValueError):
    """Bad instance configuration (size, image, env or secrets)."""


class ForbiddenEnvNameError(ConfigError):
    """An env or secret name on the forbidden list (loader and interpreter hooks, names the host owns)."""


def forbidden_env_name(name: str) -> bool:
    """True when ``name`` is on the forbidden list (compared case-insensitively)."""
    upper = name.upper()
    return (upper in FORBIDDEN_ENV_NAMES or upper.startswith(FORBIDDEN_ENV_PREFIXES)
            or upper.endswith(FORBIDDEN_ENV_SUFFIXES))


def new_instance_id() -> str:
    return f"ins_{_pysecrets.token_hex(8)}"


def new_sandbox_id() -> str:
    return f"sbx_{_pysecrets.token_hex(8)}"


def app_name_for(user_id: str, prefix: str, secret: str) -> str:
    """The provider app of one owner: ``<prefix>-<12 hex of HMAC-SHA256(secret, user_id)>``.

    Instances created before the HMAC keep the app stored in their record (``sha256(user_id)``); only new
    instances get HMAC names, so one user may own apps of both kinds."""
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "sk"
    if not clean[0].isalpha():
        clean = f"sk-{clean}"
    if not secret:
        raise ValueError("the app-name secret must not be empty")
    digest = hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:12]
    return f"{clean[:40]}-{digest}"


def volume_name(record: InstanceRecord) -> str:
    return record.id.replace("-", "_")[:30]


def machine_name(record: InstanceRecord, *, recovery: bool = False) -> str:
    if not recovery or record.recovery_started_at is None:
        return record.id
    return f"{record.id}-r{int(record.recovery_started_at.timestamp())}"


def guest_for(size: str) -> Guest:
    try:
        return SIZES[size].model_copy()
    except KeyError:
        raise ConfigError(f"unknown machine size {size!r}; one of: {', '.join(SIZES)}") from None


def validate_size(size: str) -> str:
    if not isinstance(size, str):
        raise ConfigError("size must be a string")
    guest_for(size)
    return size


def validate_image(image: str) -> str:
    if not isinstance(image, str) or not image.strip():
        raise ConfigError("image must be a non-empty string")
    image = image.strip()
    if len(image) > MAX_IMAGE_LEN or not _IMAGE_RE.match(image):
        raise ConfigError(f"image {image[:60]!r} is not a valid image reference")
    return image


def validate_env_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigError(f"{what} name {str(name)[:60]!r} is invalid: use letters, digits and '_', "
                          f"not starting with a digit (max 128)")
    if forbidden_env_name(name):
        raise ForbiddenEnvNameError(
            f"{what} name {name!r} is not allowed: it would hook the dynamic loader or an interpreter, or it "
            f"belongs to the machine host (refused: LD_*, DYLD_*, PYTHON*, *_PRELOAD, BASH_ENV, ENV, "
            f"NODE_OPTIONS, PERL5OPT, RUBYOPT, JAVA_TOOL_OPTIONS, PATH, IFS, FLY_*, SANDKEEP_* and similar; "
            f"see the README's security model)")
    return name


def validate_env(values: object, what: str = "env") -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{what} must be an object of strings")
    if len(values) > MAX_ENV_ENTRIES:
        raise ConfigError(f"{what} has more than {MAX_ENV_ENTRIES} entries")
    out: dict[str, str] = {}
    for name, value in values.items():
        validate_env_name(name, what)
        if not isinstance(value, str):
            raise ConfigError(f"{what} value of {name!r} must be a string")
        if len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise ConfigError(f"{what} value of {name!r} is too long or contains NUL")
        out[name] = value
    return out


def machine_metadata(record: InstanceRecord) -> dict[str, str]:
    return {METADATA_SANDBOX: record.sandbox_id, METADATA_USER: record.user_id, METADATA_INSTANCE: record.id,
            METADATA_GENERATION: str(record.config_generation)}


def machine_guest(record: InstanceRecord) -> Guest:
    """The instance's chosen guest (CPU kind, CPUs, memory) when it has one, else its size's preset."""
    if record.guest_cpus and record.guest_memory_mb:
        return Guest(cpu_kind=record.guest_cpu_kind or "shared", cpus=record.guest_cpus,
                     memory_mb=record.guest_memory_mb)
    return guest_for(record.machine_size) if record.machine_size in SIZES else SIZES["shared-cpu-1x"]


def build_machine_config(record: InstanceRecord, *, volume_id: str, secrets: Mapping[str, str],
                         gateway_port: int, gateway_token: str | None = None,
                         beat_env: Mapping[str, str] | None = None) -> MachineConfig:
    """The configuration a machine of this instance gets now (current image, size, env, secrets, the
    instance's gateway token and, with ``beat_env``, where and how often its gateway beats)."""
    # names on the forbidden list never reach a machine, even when stored before the list existed
    env = {k: v for k, v in record.env.items() if not forbidden_env_name(k)}
    env.update({k: v for k, v in secrets.items() if not forbidden_env_name(k)})
    env["PORT"] = str(gateway_port)  # the local host overrides it with the port it picked
    if gateway_token:
        env[GATEWAY_TOKEN_ENV] = gateway_token
        env.update(beat_env or {})
    return MachineConfig(
        image=record.image,
        env=env,
        guest=machine_guest(record),
        mounts=[Mount(volume=volume_id, path=VOLUME_MOUNT_PATH, name="data")],
        metadata=machine_metadata(record),
        services=[{"protocol": "tcp", "internal_port": gateway_port,
                   "ports": [{"port": 443, "handlers": ["tls", "http"]}, {"port": 80, "handlers": ["http"]}]}],
        restart={"policy": "no"},
    )


def machine_generation(metadata: Mapping[str, str]) -> int | None:
    raw = metadata.get(METADATA_GENERATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
