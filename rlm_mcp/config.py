"""All configuration, read from the environment in this one place.

Every variable is documented in the README's "Environment variables" table; keep the two in step.
Provider keys (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ...) are not read here: litellm reads
them itself, in the server process only, and sandboxes never see them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard, overload

from rlm_mcp.errors import ConfigError

SANDBOX_NAMES = ("local", "docker", "daytona")
MAX_MESSAGE_MB = 64  # one worker-to-host protocol message (a sub-call prompt, a cell result)
MAX_SANDBOXES = 16   # live sandboxes per server, all runs and child RLMs together
LOCAL_ISOLATION = ("auto", "bwrap", "none")
MODEL_CLIENTS = ("auto", "litellm")
LOCAL_UID = 65534  # uid and gid of local sandboxes when the server runs as root (nobody)
SESSION_TTL_S = 300.0           # a finished run's sandbox stays this long for follow-ups
MAX_KEPT_SANDBOXES = 4          # idle sandboxes kept for follow-ups, server-wide ...
KEPT_SANDBOXES_MEMORY_MB = 8192  # ... and the memory they may reserve (RLM_MCP_SANDBOX_MEMORY_MB each)
COMPACTION_THRESHOLD = 0.85     # compact the root conversation at this share of the model's window
MAX_PROMPT_FILE_CHARS = 100_000


def default_home(environ: Mapping[str, str]) -> Path:
    """The platform's per-user data directory for rlm-mcp."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "rlm-mcp"
    if os.name == "nt":
        base = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "rlm-mcp"
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "rlm-mcp"


@dataclass(frozen=True)
class Limits:
    """Per-run limits; ``None`` means unlimited. Shared by a run and all its child RLMs."""

    max_iterations: int = 30
    max_depth: int = 1
    cell_timeout_s: float = 300.0
    timeout_s: float | None = 1800.0
    max_subcalls: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_output_chars: int = 20_000
    max_concurrency: int = 32
    max_errors: int | None = None  # consecutive failing code blocks that end the run

    def validated(self) -> "Limits":
        """Return self, or raise ConfigError naming the first absurd or contradictory value."""
        checks = [
            ("max_iterations", self.max_iterations, 1, 1000),
            ("max_depth", self.max_depth, 1, 5),
            ("cell_timeout_s", self.cell_timeout_s, 0.1, 86_400),
            ("timeout_s", self.timeout_s, 0.1, 7 * 86_400),
            ("max_subcalls", self.max_subcalls, 0, 1_000_000),
            ("max_tokens", self.max_tokens, 1, 10**10),
            ("max_cost_usd", self.max_cost_usd, 0, 100_000),
            ("max_output_chars", self.max_output_chars, 100, 1_000_000),
            ("max_concurrency", self.max_concurrency, 1, 1024),
            ("max_errors", self.max_errors, 1, 1000),
        ]
        for name, value, low, high in checks:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number from {low} to {high:,}, got {value!r}")
        if self.timeout_s is not None and self.cell_timeout_s > self.timeout_s:
            raise ConfigError(
                f"cell_timeout_s ({self.cell_timeout_s:g}) cannot exceed timeout_s "
                f"({self.timeout_s:g}): lower cell_timeout_s or raise timeout_s")
        return self

    def with_overrides(self, **overrides: object) -> "Limits":
        """A copy with the non-None overrides applied, validated.

        A ``timeout_s`` given without ``cell_timeout_s`` brings the cell timeout down with it:
        otherwise the default 300 s cell timeout would make every shorter run invalid. Both
        given, and contradictory, is refused: the caller asked for a cell limit that can never
        apply, and saying so beats guessing which of the two was meant."""
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        limits = replace(self, **given)
        if "cell_timeout_s" not in given:
            limits = limits.cell_within_run()
        return limits.validated()

    def cell_within_run(self) -> "Limits":
        """A copy whose cell timeout is at most the run's timeout (unchanged if already so)."""
        run, cell = self.timeout_s, self.cell_timeout_s
        if _is_number(run) and _is_number(cell) and run > 0 and cell > run:
            return replace(self, cell_timeout_s=run)
        return self


@dataclass(frozen=True)
class Settings:
    """Everything rlm-mcp reads from the environment."""

    model: str | None = None
    sub_model: str | None = None
    api_base: str | None = None
    api_key: str | None = None
    sandbox: str = "local"
    home: Path = field(default_factory=lambda: default_home(os.environ))
    limits: Limits = field(default_factory=Limits)
    allowed_models: tuple[str, ...] = ()
    model_timeout_s: float = 300.0
    model_retries: int = 3
    model_client: str = "auto"  # auto: direct HTTP for openai/<name> + api_base; litellm: always litellm
    adaptive_concurrency: bool = True
    max_runs: int = 4
    auth_token: str | None = None
    no_auth: bool = False
    allowed_roots: tuple[Path, ...] = ()
    allow_private_urls: bool = False
    max_context_bytes: int = 2 * 1024**3
    max_inline_chars: int = 1_000_000
    max_files: int = 20_000
    url_timeout_s: float = 120.0
    local_isolation: str = "auto"
    local_uid: int = LOCAL_UID
    sandbox_memory_mb: int = 4096
    sandbox_cpus: float = 1.0
    sandbox_pids: int = 256
    max_message_mb: int = MAX_MESSAGE_MB
    max_sandboxes: int = MAX_SANDBOXES
    docker_image: str = "rlm-mcp-sandbox:latest"
    docker_pool_size: int = 0
    daytona_api_key: str | None = None
    daytona_api_url: str | None = None
    daytona_target: str | None = None
    daytona_snapshot: str | None = None
    daytona_network_block_all: bool = True
    daytona_auto_stop_minutes: int = 15
    session_ttl_s: float = SESSION_TTL_S
    max_kept_sandboxes: int = MAX_KEPT_SANDBOXES
    kept_sandboxes_memory_mb: int = KEPT_SANDBOXES_MEMORY_MB
    context_window: int | None = None  # root model's window in tokens; None: litellm's model table
    compaction_threshold: float = COMPACTION_THRESHOLD
    system_prompt: str | None = None  # a template (see prompts.PLACEHOLDERS); None: the built-in one
    log_level: str = "INFO"

    @property
    def effective_sub_model(self) -> str | None:
        return self.sub_model or self.model

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read settings; raise ConfigError naming the variable for any malformed value."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        # The field defaults above are the one place each default is written; unset variables take them.
        base = Limits()
        d = cls(home=Path(), limits=base)
        limits = Limits(
            max_iterations=reader.integer("RLM_MCP_MAX_ITERATIONS", base.max_iterations),
            max_depth=reader.integer("RLM_MCP_MAX_DEPTH", base.max_depth),
            cell_timeout_s=reader.number("RLM_MCP_CELL_TIMEOUT_S", base.cell_timeout_s),
            timeout_s=reader.number("RLM_MCP_TIMEOUT_S", base.timeout_s),
            max_subcalls=reader.integer("RLM_MCP_MAX_SUBCALLS", base.max_subcalls),
            max_tokens=reader.integer("RLM_MCP_MAX_TOKENS", base.max_tokens),
            max_cost_usd=reader.number("RLM_MCP_MAX_COST_USD", base.max_cost_usd),
            max_output_chars=reader.integer("RLM_MCP_MAX_OUTPUT_CHARS", base.max_output_chars),
            max_concurrency=reader.integer("RLM_MCP_MAX_CONCURRENCY", base.max_concurrency),
            max_errors=reader.integer("RLM_MCP_MAX_ERRORS", base.max_errors),
        )
        if reader.absent("RLM_MCP_CELL_TIMEOUT_S"):  # a short RLM_MCP_TIMEOUT_S alone lowers it too
            limits = limits.cell_within_run()
        try:
            limits.validated()
        except ConfigError as exc:
            raise ConfigError(f"invalid limit in the environment: {exc}") from None
        sandbox = (env.get("RLM_MCP_SANDBOX") or "").strip().lower() or d.sandbox
        if sandbox not in SANDBOX_NAMES:
            raise ConfigError(f"RLM_MCP_SANDBOX must be one of {', '.join(SANDBOX_NAMES)}, got {sandbox!r}")
        isolation = (env.get("RLM_MCP_LOCAL_ISOLATION") or "").strip().lower() or d.local_isolation
        if isolation not in LOCAL_ISOLATION:
            raise ConfigError(f"RLM_MCP_LOCAL_ISOLATION must be one of {', '.join(LOCAL_ISOLATION)}, got {isolation!r}")
        model_client = (env.get("RLM_MCP_MODEL_CLIENT") or "").strip().lower() or d.model_client
        if model_client not in MODEL_CLIENTS:
            raise ConfigError(f"RLM_MCP_MODEL_CLIENT must be one of {', '.join(MODEL_CLIENTS)}, got {model_client!r}")
        threshold = reader.number("RLM_MCP_COMPACTION_THRESHOLD", d.compaction_threshold)
        if threshold is not None and threshold > 1:
            raise ConfigError(f"RLM_MCP_COMPACTION_THRESHOLD is a share of the context window from 0 (off) to 1, "
                              f"got {threshold}")
        prompt_file = (env.get("RLM_MCP_SYSTEM_PROMPT_FILE") or "").strip()
        home = env.get("RLM_MCP_HOME")
        roots = tuple(Path(p).expanduser().resolve() for p in env.get("RLM_MCP_ALLOWED_ROOTS", "").split(os.pathsep) if p.strip())
        return cls(
            model=env.get("RLM_MCP_MODEL") or None,
            sub_model=env.get("RLM_MCP_SUB_MODEL") or None,
            api_base=env.get("RLM_MCP_API_BASE") or None,
            api_key=env.get("RLM_MCP_API_KEY") or None,
            sandbox=sandbox,
            home=Path(home).expanduser() if home else default_home(env),
            limits=limits,
            allowed_models=tuple(m.strip() for m in env.get("RLM_MCP_ALLOWED_MODELS", "").split(",") if m.strip()),
            model_timeout_s=reader.number("RLM_MCP_MODEL_TIMEOUT_S", d.model_timeout_s),
            model_retries=reader.integer("RLM_MCP_MODEL_RETRIES", d.model_retries),
            model_client=model_client,
            adaptive_concurrency=reader.flag("RLM_MCP_ADAPTIVE_CONCURRENCY", d.adaptive_concurrency),
            max_runs=reader.integer("RLM_MCP_MAX_RUNS", d.max_runs, low=1),
            auth_token=env.get("RLM_MCP_AUTH_TOKEN") or None,
            no_auth=reader.flag("RLM_MCP_NO_AUTH", d.no_auth),
            allowed_roots=roots,
            allow_private_urls=reader.flag("RLM_MCP_ALLOW_PRIVATE_URLS", d.allow_private_urls),
            max_context_bytes=reader.integer("RLM_MCP_MAX_CONTEXT_BYTES", d.max_context_bytes, low=1),
            max_inline_chars=reader.integer("RLM_MCP_MAX_INLINE_CHARS", d.max_inline_chars, low=1),
            max_files=reader.integer("RLM_MCP_MAX_FILES", d.max_files, low=1),
            url_timeout_s=reader.number("RLM_MCP_URL_TIMEOUT_S", d.url_timeout_s),
            local_isolation=isolation,
            local_uid=reader.integer("RLM_MCP_LOCAL_UID", d.local_uid, low=1),
            sandbox_memory_mb=reader.integer("RLM_MCP_SANDBOX_MEMORY_MB", d.sandbox_memory_mb, low=64),
            sandbox_cpus=reader.number("RLM_MCP_SANDBOX_CPUS", d.sandbox_cpus),
            sandbox_pids=reader.integer("RLM_MCP_SANDBOX_PIDS", d.sandbox_pids, low=8),
            max_message_mb=reader.integer("RLM_MCP_MAX_MESSAGE_MB", d.max_message_mb, low=1),
            # At least the deepest allowed max_depth: a run needs one sandbox per level to progress.
            max_sandboxes=reader.integer("RLM_MCP_MAX_SANDBOXES", d.max_sandboxes, low=5),
            docker_image=env.get("RLM_MCP_DOCKER_IMAGE") or d.docker_image,
            docker_pool_size=reader.integer("RLM_MCP_DOCKER_POOL", d.docker_pool_size),
            daytona_api_key=env.get("DAYTONA_API_KEY") or None,
            daytona_api_url=env.get("DAYTONA_API_URL") or None,
            daytona_target=env.get("DAYTONA_TARGET") or None,
            daytona_snapshot=env.get("RLM_MCP_DAYTONA_SNAPSHOT") or None,
            daytona_network_block_all=reader.flag("RLM_MCP_DAYTONA_NETWORK_BLOCK_ALL", d.daytona_network_block_all),
            daytona_auto_stop_minutes=reader.integer("RLM_MCP_DAYTONA_AUTO_STOP_MINUTES", d.daytona_auto_stop_minutes),
            session_ttl_s=reader.number("RLM_MCP_SESSION_TTL_S", d.session_ttl_s),
            max_kept_sandboxes=reader.integer("RLM_MCP_MAX_KEPT_SANDBOXES", d.max_kept_sandboxes),
            kept_sandboxes_memory_mb=reader.integer("RLM_MCP_KEPT_SANDBOXES_MEMORY_MB", d.kept_sandboxes_memory_mb),
            context_window=reader.integer("RLM_MCP_CONTEXT_WINDOW", d.context_window, low=1_000),
            compaction_threshold=threshold,
            system_prompt=read_prompt_file(prompt_file, "RLM_MCP_SYSTEM_PROMPT_FILE") if prompt_file else None,
            log_level=(env.get("RLM_MCP_LOG_LEVEL") or d.log_level).upper(),
        )


def read_prompt_file(path: str | Path, source: str) -> str:
    """A system prompt template from a file (``source`` names the setting, for the error)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{source}: cannot read the system prompt file {str(path)!r}: {reason}") from None
    if not text.strip() or len(text) > MAX_PROMPT_FILE_CHARS:
        raise ConfigError(f"{source}: the system prompt file {str(path)!r} has {len(text):,} characters: it must "
                          f"have some text and at most {MAX_PROMPT_FILE_CHARS:,}")
    return text


def _is_number(value: object) -> TypeGuard[float]:
    """An int or float, not a bool (limits may come from JSON arguments)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value and value.strip() else None

    def absent(self, name: str) -> bool:
        return self._raw(name) is None

    @overload
    def integer(self, name: str, default: int, low: int = 0) -> int: ...

    @overload
    def integer(self, name: str, default: None, low: int = 0) -> int | None: ...

    def integer(self, name: str, default: int | None, low: int = 0) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
        return value

    @overload
    def number(self, name: str, default: float) -> float: ...

    @overload
    def number(self, name: str, default: None) -> float | None: ...

    def number(self, name: str, default: float | None) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
