"""Settings from the environment: every variable read, every malformed value refused with the
variable's name, and the defaults the same whether the environment is empty or not read at all."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rlm_mcp.config import Limits, Settings, default_home
from rlm_mcp.errors import ConfigError


def test_an_empty_environment_gives_the_declared_defaults():
    from_env = Settings.from_env({})
    assert replace(from_env, home=Path("/h")) == replace(Settings(), home=Path("/h"))
    assert from_env.limits == Limits()
    assert from_env.home == default_home({})


def test_blank_values_count_as_unset():
    blank = {name: "  " for name in ("RLM_MCP_MAX_ITERATIONS", "RLM_MCP_TIMEOUT_S", "RLM_MCP_NO_AUTH",
                                     "RLM_MCP_MAX_RUNS", "RLM_MCP_SANDBOX")}
    assert Settings.from_env(blank) == Settings.from_env({})


@pytest.mark.parametrize("variable, value, read", [
    ("RLM_MCP_MODEL", "openai/gpt-4.1-mini", lambda s: s.model == "openai/gpt-4.1-mini"),
    ("RLM_MCP_SUB_MODEL", "openai/small", lambda s: s.sub_model == s.effective_sub_model == "openai/small"),
    ("RLM_MCP_API_BASE", "http://127.0.0.1:8321/v1", lambda s: s.api_base == "http://127.0.0.1:8321/v1"),
    ("RLM_MCP_API_KEY", "sk-local", lambda s: s.api_key == "sk-local"),
    ("RLM_MCP_SANDBOX", " Docker ", lambda s: s.sandbox == "docker"),
    ("RLM_MCP_HOME", "/tmp/rlm-home", lambda s: s.home == Path("/tmp/rlm-home")),
    ("RLM_MCP_ALLOWED_MODELS", "a/x, b/y,,", lambda s: s.allowed_models == ("a/x", "b/y")),
    ("RLM_MCP_MODEL_TIMEOUT_S", "12.5", lambda s: s.model_timeout_s == 12.5),
    ("RLM_MCP_MODEL_RETRIES", "0", lambda s: s.model_retries == 0),
    ("RLM_MCP_MAX_RUNS", "9", lambda s: s.max_runs == 9),
    ("RLM_MCP_AUTH_TOKEN", "tok", lambda s: s.auth_token == "tok"),
    ("RLM_MCP_NO_AUTH", "yes", lambda s: s.no_auth is True),
    ("RLM_MCP_ALLOWED_ROOTS", os.pathsep.join(["/tmp/a", "", "/tmp/b"]),
     lambda s: s.allowed_roots == (Path("/tmp/a").resolve(), Path("/tmp/b").resolve())),
    ("RLM_MCP_ALLOW_PRIVATE_URLS", "ON", lambda s: s.allow_private_urls is True),
    ("RLM_MCP_MAX_CONTEXT_BYTES", "1000", lambda s: s.max_context_bytes == 1000),
    ("RLM_MCP_MAX_INLINE_CHARS", "500", lambda s: s.max_inline_chars == 500),
    ("RLM_MCP_MAX_FILES", "7", lambda s: s.max_files == 7),
    ("RLM_MCP_URL_TIMEOUT_S", "3", lambda s: s.url_timeout_s == 3.0),
    ("RLM_MCP_LOCAL_ISOLATION", "BWRAP", lambda s: s.local_isolation == "bwrap"),
    ("RLM_MCP_LOCAL_UID", "1234", lambda s: s.local_uid == 1234),
    ("RLM_MCP_SANDBOX_MEMORY_MB", "512", lambda s: s.sandbox_memory_mb == 512),
    ("RLM_MCP_SANDBOX_CPUS", "0.5", lambda s: s.sandbox_cpus == 0.5),
    ("RLM_MCP_SANDBOX_PIDS", "64", lambda s: s.sandbox_pids == 64),
    ("RLM_MCP_MAX_MESSAGE_MB", "8", lambda s: s.max_message_mb == 8),
    ("RLM_MCP_MAX_SANDBOXES", "40", lambda s: s.max_sandboxes == 40),
    ("RLM_MCP_DOCKER_IMAGE", "mine:1", lambda s: s.docker_image == "mine:1"),
    ("RLM_MCP_DOCKER_POOL", "2", lambda s: s.docker_pool_size == 2),
    ("DAYTONA_API_KEY", "dk", lambda s: s.daytona_api_key == "dk"),
    ("DAYTONA_API_URL", "https://d.invalid/api", lambda s: s.daytona_api_url == "https://d.invalid/api"),
    ("DAYTONA_TARGET", "eu", lambda s: s.daytona_target == "eu"),
    ("RLM_MCP_DAYTONA_SNAPSHOT", "snap", lambda s: s.daytona_snapshot == "snap"),
    ("RLM_MCP_DAYTONA_NETWORK_BLOCK_ALL", "false", lambda s: s.daytona_network_block_all is False),
    ("RLM_MCP_DAYTONA_AUTO_STOP_MINUTES", "5", lambda s: s.daytona_auto_stop_minutes == 5),
    ("RLM_MCP_LOG_LEVEL", "debug", lambda s: s.log_level == "DEBUG"),
    ("RLM_MCP_MAX_ITERATIONS", "12", lambda s: s.limits.max_iterations == 12),
    ("RLM_MCP_MAX_DEPTH", "3", lambda s: s.limits.max_depth == 3),
    ("RLM_MCP_CELL_TIMEOUT_S", "30", lambda s: s.limits.cell_timeout_s == 30),
    ("RLM_MCP_TIMEOUT_S", "600", lambda s: (s.limits.timeout_s, s.limits.cell_timeout_s) == (600, 300)),
    ("RLM_MCP_MAX_SUBCALLS", "100", lambda s: s.limits.max_subcalls == 100),
    ("RLM_MCP_MAX_TOKENS", "5000", lambda s: s.limits.max_tokens == 5000),
    ("RLM_MCP_MAX_COST_USD", "1.5", lambda s: s.limits.max_cost_usd == 1.5),
    ("RLM_MCP_MAX_OUTPUT_CHARS", "4000", lambda s: s.limits.max_output_chars == 4000),
    ("RLM_MCP_MAX_CONCURRENCY", "8", lambda s: s.limits.max_concurrency == 8),
])
def test_each_variable_is_read(variable, value, read):
    settings = Settings.from_env({variable: value})
    assert read(settings)
    assert settings != Settings.from_env({})  # the variable changed something


@pytest.mark.parametrize("variable, value, message", [
    ("RLM_MCP_MAX_RUNS", "four", "RLM_MCP_MAX_RUNS must be a whole number, got 'four'"),
    ("RLM_MCP_MAX_RUNS", "0", "RLM_MCP_MAX_RUNS must be at least 1, got 0"),
    ("RLM_MCP_MODEL_RETRIES", "1.5", "RLM_MCP_MODEL_RETRIES must be a whole number"),
    ("RLM_MCP_MODEL_TIMEOUT_S", "soon", "RLM_MCP_MODEL_TIMEOUT_S must be a number, got 'soon'"),
    ("RLM_MCP_URL_TIMEOUT_S", "-1", "RLM_MCP_URL_TIMEOUT_S must not be negative"),
    ("RLM_MCP_NO_AUTH", "maybe", "RLM_MCP_NO_AUTH must be true or false, got 'maybe'"),
    ("RLM_MCP_ALLOW_PRIVATE_URLS", "2", "RLM_MCP_ALLOW_PRIVATE_URLS must be true or false"),
    ("RLM_MCP_SANDBOX", "kubernetes", "RLM_MCP_SANDBOX must be one of local, docker, daytona, got 'kubernetes'"),
    ("RLM_MCP_LOCAL_ISOLATION", "chroot", "RLM_MCP_LOCAL_ISOLATION must be one of auto, bwrap, none"),
    ("RLM_MCP_LOCAL_UID", "0", "RLM_MCP_LOCAL_UID must be at least 1"),
    ("RLM_MCP_SANDBOX_MEMORY_MB", "16", "RLM_MCP_SANDBOX_MEMORY_MB must be at least 64"),
    ("RLM_MCP_SANDBOX_PIDS", "2", "RLM_MCP_SANDBOX_PIDS must be at least 8"),
    ("RLM_MCP_MAX_SANDBOXES", "4", "RLM_MCP_MAX_SANDBOXES must be at least 5"),
    ("RLM_MCP_MAX_CONTEXT_BYTES", "0", "RLM_MCP_MAX_CONTEXT_BYTES must be at least 1"),
    ("RLM_MCP_MAX_ITERATIONS", "x", "RLM_MCP_MAX_ITERATIONS must be a whole number"),
    ("RLM_MCP_MAX_COST_USD", "free", "RLM_MCP_MAX_COST_USD must be a number"),
])
def test_a_malformed_value_names_the_variable(variable, value, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert message in str(caught.value)


@pytest.mark.parametrize("variable, value, message", [
    ("RLM_MCP_MAX_ITERATIONS", "0", "max_iterations must be a number from 1 to 1,000, got 0"),
    ("RLM_MCP_MAX_DEPTH", "6", "max_depth must be a number from 1 to 5, got 6"),
    ("RLM_MCP_MAX_CONCURRENCY", "5000", "max_concurrency must be a number from 1 to 1,024"),
    ("RLM_MCP_MAX_OUTPUT_CHARS", "10", "max_output_chars must be a number from 100"),
])
def test_an_out_of_range_limit_is_refused_as_an_invalid_limit(variable, value, message):
    with pytest.raises(ConfigError, match="invalid limit in the environment") as caught:
        Settings.from_env({variable: value})
    assert message in str(caught.value)


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_DATA_HOME is the Linux layout (macOS and Windows have theirs)")
def test_the_data_directory_follows_xdg_data_home(tmp_path):
    assert default_home({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "rlm-mcp"
    assert Settings.from_env({"XDG_DATA_HOME": str(tmp_path)}).home == tmp_path / "rlm-mcp"
    assert default_home({}) == Path.home() / ".local" / "share" / "rlm-mcp"
