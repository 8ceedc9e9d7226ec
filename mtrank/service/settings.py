"""Service configuration: environment variables with the ``MTRANK_`` prefix (docs/architecture.md §6).

Every field has a default and a one-line doc. :func:`load_settings` turns any validation error
into a :class:`ConfigError` whose one-line message names the variable, e.g.
``MTRANK_BUCKETS: shares add up to 90, not 100``. :func:`unknown_variables` names the
``MTRANK_*`` variables that are no setting (a misspelt one would otherwise be silently ignored).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from mtrank.fusion import BucketConfig, check_buckets
from mtrank.store_keys import redacted_url
from mtrank.stores import registry

ENV_PREFIX = "MTRANK_"
# MTRANK_* variables that the project's test and load tools read, not the service.
TOOL_VARIABLES = ("MTRANK_LOCUST_", "MTRANK_TEST_", "MTRANK_SHARED_DATA")


DEPRECATED_VARIABLES = {
    "MTRANK_REDIS_URL": "MTRANK_STORE_URL",
    "MTRANK_REDIS_PREFIX": "MTRANK_STORE_PREFIX",
    "MTRANK_REDIS_TIMEOUT_MS": "MTRANK_STORE_TIMEOUT_MS",
    "MTRANK_REDIS_RETRY_S": "MTRANK_STORE_RETRY_S",
}
"""Old name → new name: the old names still work in this version, with a warning at start-up."""


def _env(name: str) -> AliasChoices:
    """A setting read from ``MTRANK_<NAME>`` or, when that is unset, its deprecated old name."""
    new = f"{ENV_PREFIX}{name.upper()}"
    old = [o for o, n in DEPRECATED_VARIABLES.items() if n == new]
    return AliasChoices(new, *old)


AUTO_WORKERS_MAX = 8
"""Most serving processes ``MTRANK_WORKERS=0`` starts (each holds its own models and caches)."""


class ConfigError(ValueError):
    """A bad setting; the message is one line and starts with the variable's name."""


class Settings(BaseSettings):
    """All service settings; read from ``MTRANK_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True)

    model_repo: Path | None = None
    """Model repository root (``REPO/<model>/<version>/``)."""
    store_url: SecretStr | None = Field(None, validation_alias=_env("store_url"))
    """Embedding store holding the tables (``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://``, ``rediss+cluster://``); None or ``inprocess://`` = the in-process store.
    A secret: messages show it without its password (:func:`mtrank.store_keys.redacted_url`)."""
    store_prefix: str = Field("mtrank", min_length=1, max_length=128, validation_alias=_env("store_prefix"))
    """Key prefix of the embedding tables in the store."""
    store_timeout_ms: float = Field(100.0, gt=0.0, le=10_000.0, validation_alias=_env("store_timeout_ms"))
    """Connect/read timeout of store calls, milliseconds."""
    store_retry_s: float = Field(1.0, gt=0.0, le=300.0, validation_alias=_env("store_retry_s"))
    """After a store failure, seconds before the next attempt (answers are degraded meanwhile)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """ONNX Runtime device: auto = CUDA when usable, else CPU; cuda without a GPU is a start-up error."""
    max_batch_rows: int = Field(0, ge=0, le=1_000_000)
    """Most rows (candidates) one inference call concatenates; 0 = measured per graph at load: the
    smallest batch within 3 % of the graph's best rows/s (bigger batches can be slower per row)."""
    max_queue_delay_ms: float = Field(2.0, ge=0.0, le=1000.0)
    """Longest extra wait batching adds, milliseconds: only while the graph is busy does a partial
    batch wait (at most this, counted from its oldest request) for more rows; an idle graph runs
    a request at once."""
    max_queue_rows: int = Field(65536, ge=1, le=100_000_000)
    """Rows allowed waiting per graph, a hard cap; beyond it requests get 503 + Retry-After."""
    max_concurrent_batches: int = Field(0, ge=0, le=64)
    """Batches of one graph in flight at once; 0 = one per CPU core plus one, so the engine keeps
    every core busy while the event loop holds one (500 candidates on 2 cores: +10 % requests/s
    over one per core; 20 candidates: within noise)."""
    max_candidates: int = Field(2000, ge=1, le=100_000)
    """Most candidates per request; more is a 413."""
    max_list_len: int = Field(1000, ge=1, le=100_000)
    """Longest list (``multi`` or ``sequence`` feature) in a request; longer is a 413. Lists longer
    than their field's ``max_len`` but within this are cut to ``max_len`` (counted)."""
    request_timeout_ms: float = Field(1000.0, gt=0.0, le=600_000.0)
    """Deadline of a ranking request, milliseconds; past it the answer is 504."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1 << 30)
    """Largest request body, bytes; more is a 413."""
    admin_token: SecretStr | None = None
    """Bearer token for /admin/*; None disables the admin endpoints (403)."""
    buckets: list[BucketConfig] | None = None
    """A/B buckets as JSON; None = one bucket "default" (100 %, first model, weights 1, f none)."""
    bucket_salt: str = Field("mtrank", max_length=256)
    """Salt of the user-id hash that assigns buckets; changing it reshuffles users."""
    host: str = "127.0.0.1"
    """Listen address."""
    port: int = Field(8000, ge=1, le=65535)
    """Listen port."""
    cpus: int = Field(0, ge=0, le=1024)
    """CPU cores the service may use; the worker count, batches in flight and intra-op threads
    follow from it. 0 = the CPU set and the container's CPU quota. Without a CPU limit (common on
    Kubernetes) set it to the pod's CPU request: the node's cores are not the pod's."""
    workers: int = Field(0, ge=0, le=64)
    """Serving processes sharing the port (SO_REUSEPORT, Linux): each has its own event loop, models
    and share of the cores; more than one uses more cores for decoding, features and responses.
    0 = one per core (``cpus``), at most :data:`AUTO_WORKERS_MAX`."""
    reload_interval_s: float = Field(0.0, ge=0.0, le=86400.0)
    """Poll the repository for new versions every N seconds; 0 = only on POST /admin/reload."""
    drain_timeout_s: float = Field(20.0, ge=0.0, le=3600.0)
    """On SIGTERM, seconds to let in-flight requests finish."""
    intra_op_threads: int = Field(0, ge=0, le=1024)
    """ONNX Runtime intra-op threads per session; 0 = cores ÷ concurrent batches, so the batches in
    flight together use every core once."""
    embedding_cache_size: int = Field(200_000, ge=0, le=100_000_000)
    """Entries of the in-process cache in front of Redis; 0 disables it."""
    embedding_cache_ttl_s: float = Field(60.0, ge=0.0, le=86400.0)
    """Seconds a cached Redis value is reused."""
    batching: bool = True
    """Dynamic batching; false = one inference per request (the naive baseline)."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Log level of the service and uvicorn."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as plain text, or one JSON object per line (one per request and per event)."""
    log_flush_ms: float = Field(100.0, ge=0.0, le=10_000.0)
    """Log lines are written in blocks at least this often (and at once for warnings and errors);
    0, or a terminal on stderr, writes each line as it comes."""
    impression_log: Path | None = None
    """Directory of the impression log (docs/impressions.md): one Parquet record per answered
    ``/v1/rank``, written by a thread off the hot path; None = off."""
    impression_sample: float = Field(1.0, ge=0.0, le=1.0)
    """Share of answered requests logged, chosen by a stable hash of the request id (a request is
    logged whole or not at all, in every replica alike)."""
    impression_queue_rows: int = Field(100_000, ge=1, le=100_000_000)
    """Candidates (of all requests) waiting for the log's writer; a record beyond it is dropped and
    counted (``mtrank_impressions_dropped_total{reason="queue_full"}``), ranking goes on."""
    impression_rotate_mb: float = Field(64.0, gt=0.0, le=65536.0)
    """A log file is completed (renamed into place) once it holds this many MiB..."""
    impression_rotate_s: float = Field(60.0, gt=0.0, le=86400.0)
    """... or once it is this many seconds old, whichever comes first."""
    impression_compression: Literal["lz4", "zstd", "snappy", "none"] = "lz4"
    """The log files' Parquet compression. lz4 takes about half the CPU of zstd for a 100-candidate
    record and writes files about twice as large (docs/impressions.md has the figures)."""
    otel_endpoint: str | None = None
    """OTLP/HTTP endpoint (``http://collector:4318``) for OpenTelemetry traces; None = tracing off.
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is used when this is not set. Needs the ``otel`` extra."""

    def cores(self) -> int:
        """CPU cores this service may use: ``cpus``, else what :func:`available_cores` finds."""
        return self.cpus or available_cores()

    def worker_count(self) -> int:
        """Serving processes to run: ``workers``, or one per core when it is 0."""
        return self.workers or min(AUTO_WORKERS_MAX, self.cores())

    def concurrency(self, cores: int | None = None) -> tuple[int, int]:
        """(batches in flight per graph, intra-op threads per batch) on ``cores`` CPU cores."""
        cores = cores or self.cores()
        batches = self.max_concurrent_batches or cores + 1
        threads = self.intra_op_threads or max(1, cores // batches)
        return batches, threads

    @field_validator("log_level", "log_format", "device", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("store_url", "admin_token", "model_repo", "otel_endpoint", "impression_log", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("store_url")
    @classmethod
    def _store_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        url = v.get_secret_value() if v is not None else None
        if url is not None and registry.scheme_of(url) not in registry.schemes():
            # The message reaches the operator's terminal: the URL without its password.
            raise ValueError(f"not an embedding store URL: {redacted_url(url)!r} (schemes: "
                             f"{', '.join(s + '://' for s in registry.schemes())})")
        return v

    def store_url_text(self) -> str | None:
        """The store URL, password included (for the store client only, never for a message)."""
        return self.store_url.get_secret_value() if self.store_url is not None else None

    @field_validator("buckets")
    @classmethod
    def _bucket_shares(cls, v: list[BucketConfig] | None) -> list[BucketConfig] | None:
        return v if v is None else check_buckets(v)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue_rows < self.max_candidates:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) is smaller than max_candidates ({self.max_candidates}):"
                " a full-size request could never be queued"
            )
        return self


def available_cores() -> int:
    """CPU cores this process may use: its CPU set (the container's, not the host's), and no more
    than the container's CPU quota, rounded down (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this process's cgroup in cores (a Kubernetes ``limits.cpu``, ``docker run
    --cpus``): cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` ÷ ``cpu.cfs_period_us``; None
    when there is no limit or no cgroup file to read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((root / v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; ``overrides`` (not None) win. Raises :class:`ConfigError`."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    except SettingsError as e:
        # pydantic-settings: a complex field (MTRANK_BUCKETS) that is not valid JSON.
        field = str(e).split('"')[1] if '"' in str(e) else "*"
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: not valid JSON ({e.__cause__ or e})") from None


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        # A model-level check: its message names the fields; map the first one to its variable.
        name = next((f for f in Settings.model_fields if msg.startswith(f)), None)
        var = f"{ENV_PREFIX}{name.upper()}" if name else "MTRANK_*"
        return f"{var}: {msg}"
    # A setting with aliases is located by the variable it came from (MTRANK_REDIS_URL, say).
    var = loc[0].upper() if loc[0].upper().startswith(ENV_PREFIX) else f"{ENV_PREFIX}{loc[0].upper()}"
    var = next((o for o, n in DEPRECATED_VARIABLES.items() if n == var and var not in os.environ and o in os.environ),
               var)
    where = ".".join(loc[1:])
    if err.get("type") == "list_type" and isinstance(err.get("input"), str):
        msg = "not a JSON list"  # pydantic-settings hands non-JSON text through as a string
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{var}: {where + ': ' if where else ''}{msg}{more}"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``MTRANK_*`` variable of ``environ`` (default: the process environment)
    that is no setting, naming the closest setting when one is close, e.g.
    ``MTRANK_MAX_BATCH_ROW is not a setting and is ignored; did you mean MTRANK_MAX_BATCH_ROWS?``"""
    environ = os.environ if environ is None else environ
    # pydantic-settings matches names case-insensitively.
    fields = [name.upper() for name in Settings.model_fields]
    messages = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(TOOL_VARIABLES):
            continue
        # Compared without the prefix, which every name shares and would make anything look close.
        field = upper.removeprefix(ENV_PREFIX)
        if field in fields or upper in DEPRECATED_VARIABLES:
            continue
        # A misspelt old name gets the new one.
        old_names = {o.removeprefix(ENV_PREFIX): n for o, n in DEPRECATED_VARIABLES.items()}
        closest = difflib.get_close_matches(field, [*fields, *old_names], n=1, cutoff=0.6)
        guess = old_names.get(closest[0], f"{ENV_PREFIX}{closest[0]}") if closest else None
        hint = f"; did you mean {guess}?" if guess else "; README.md lists the settings"
        messages.append(f"{name} is not a setting and is ignored{hint}")
    return messages


def deprecated_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per deprecated ``MTRANK_*`` variable set in ``environ`` (default: the process
    environment), naming its new name; the old name still works in this version."""
    environ = os.environ if environ is None else environ
    messages = []
    for old, new in DEPRECATED_VARIABLES.items():
        if old in environ:
            state = f"{new} is set too and wins" if new in environ else "it still works in this version"
            messages.append(f"{old} is deprecated; use {new} ({state})")
    return messages
