"""`omlx launch codex|claude|opencode [tool args...]`: point a coding agent at this server.

As oMLX's `omlx launch` does: check that the server answers `/health`, write the tool's own
config file so it talks to this server (the previous file is kept as a timestamped backup),
then run the tool with the remaining arguments and return its exit status.

    codex     $CODEX_HOME/config.toml (~/.codex): a `model_providers.omlx` entry with
              `wire_api = "responses"`, selected by `model_provider` and `model`
    claude    $CLAUDE_CONFIG_DIR/settings.json (~/.claude): `env` with ANTHROPIC_BASE_URL,
              ANTHROPIC_AUTH_TOKEN and the model for every tier
    opencode  $XDG_CONFIG_HOME/opencode/opencode.json (~/.config): a `provider.omlx` entry
              (@ai-sdk/openai-compatible) with the server's models, selected by `model`
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

TOOLS = ("codex", "claude", "opencode")
PROVIDER = "omlx"
INSTALL = {"codex": "npm install -g @openai/codex", "claude": "npm install -g @anthropic-ai/claude-code",
           "opencode": "npm install -g opencode-ai"}


class LaunchError(Exception):
    pass


@dataclass
class Target:
    """The server the tool is pointed at."""

    root: str  # http://HOST:PORT
    model: str
    api_key: str | None = None
    models: tuple[str, ...] = ()  # every LLM the server offers (opencode lists them)
    tiers: Mapping[str, str] | None = None  # Claude Code's opus / sonnet / haiku models

    @property
    def base_url(self) -> str:
        return self.root + "/v1"


# ---------------------------------------------------------------------------- the server


def _get(url: str, api_key: str | None, timeout: float = 5.0):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.loads(response.read())


def check_server(root: str) -> None:
    try:
        health = _get(root + "/health", None)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LaunchError(f"no omlx server answers at {root}/health ({exc}); start one with `omlx serve`") from None
    if not isinstance(health, dict) or health.get("status") not in ("ok", "healthy"):
        raise LaunchError(f"the server at {root} is not ready: {health!r}")


def server_models(root: str, api_key: str | None) -> list[str]:
    """The server's chat models, loaded ones first (the likeliest choice)."""
    try:
        status = _get(root + "/v1/models/status", api_key)
    except urllib.error.HTTPError as exc:
        hint = " (pass --api-key)" if exc.code == 401 else ""
        raise LaunchError(f"cannot list the server's models: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LaunchError(f"cannot list the server's models: {exc}") from None
    llms = [m for m in status.get("models", []) if m.get("model_type") == "llm"]
    llms.sort(key=lambda m: not m.get("loaded"))
    return [m.get("alias") or m["id"] for m in llms]


# ---------------------------------------------------------------------------- config files


def backup(path: Path) -> Path | None:
    """Copy an existing config aside before it is rewritten; returns the copy's path."""
    if not path.exists():
        return None
    copy = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while copy.exists():
        copy = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    shutil.copy2(path, copy)
    return copy


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.omlx-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LaunchError(f"{path} is not valid JSON ({exc}); fix or remove it first") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{path} does not hold a JSON object; fix or remove it first")
    return data


def codex_config(env: Mapping[str, str]) -> Path:
    return Path(env.get("CODEX_HOME") or Path.home() / ".codex").expanduser() / "config.toml"


def write_codex(target: Target, env: Mapping[str, str]) -> Path:
    path = codex_config(env)
    config: dict = {}
    if path.exists():
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LaunchError(f"{path} is not valid TOML ({exc}); fix or remove it first") from None
    provider = {"name": "omlx", "base_url": target.base_url, "wire_api": "responses"}
    if target.api_key:
        provider["env_key"] = "OMLX_API_KEY"  # set for the child; the key stays out of the file
    config.setdefault("model_providers", {})[PROVIDER] = provider
    config["model_provider"] = PROVIDER
    config["model"] = target.model
    _write(path, tomli_w.dumps(config))
    return path


def claude_settings(env: Mapping[str, str]) -> Path:
    return Path(env.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude").expanduser() / "settings.json"


def claude_env(target: Target) -> dict[str, str]:
    tiers = dict(target.tiers or {})
    return {
        "ANTHROPIC_BASE_URL": target.root,  # Claude Code appends /v1/messages itself
        "ANTHROPIC_AUTH_TOKEN": target.api_key or "omlx",
        "ANTHROPIC_MODEL": target.model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": tiers.get("opus") or target.model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": tiers.get("sonnet") or target.model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": tiers.get("haiku") or target.model,
        "ANTHROPIC_SMALL_FAST_MODEL": tiers.get("haiku") or target.model,
        # Nothing but this server: no telemetry, no update checks, no calls home.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
    }


def write_claude(target: Target, env: Mapping[str, str]) -> Path:
    path = claude_settings(env)
    settings = _read_json(path)
    current = settings.get("env")
    settings["env"] = {**(current if isinstance(current, dict) else {}), **claude_env(target)}
    _write(path, json.dumps(settings, indent=2) + "\n")
    return path


def opencode_config(env: Mapping[str, str]) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "opencode" / "opencode.json"


def write_opencode(target: Target, env: Mapping[str, str]) -> Path:
    path = opencode_config(env)
    config = _read_json(path)
    config.setdefault("$schema", "https://opencode.ai/config.json")
    options = {"baseURL": target.base_url}
    if target.api_key:
        options["apiKey"] = target.api_key
    models = dict.fromkeys([target.model, *target.models])
    providers = config.get("provider") if isinstance(config.get("provider"), dict) else {}
    providers[PROVIDER] = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "omlx",
        "options": options,
        "models": {m: {"name": m} for m in models},
    }
    config["provider"] = providers
    config["model"] = f"{PROVIDER}/{target.model}"
    _write(path, json.dumps(config, indent=2) + "\n")
    return path


WRITERS = {"codex": write_codex, "claude": write_claude, "opencode": write_opencode}


def child_env(tool: str, target: Target, env: Mapping[str, str]) -> dict[str, str]:
    out = dict(env)
    if tool == "claude":
        out.update(claude_env(target))  # the settings file says the same; env wins over any stale value
    elif tool == "codex" and target.api_key:
        out["OMLX_API_KEY"] = target.api_key
    return out


# ---------------------------------------------------------------------------- launch


def launch(tool: str, *, host: str, port: int, model: str | None, api_key: str | None,
           tool_args: list[str], tiers: Mapping[str, str] | None = None,
           env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    if tool not in WRITERS:
        raise LaunchError(f"unknown tool {tool!r}; choose one of {', '.join(TOOLS)}")
    # A server bound to every interface is reached on the loopback one.
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    root = f"http://{connect}:{port}"
    check_server(root)
    models = server_models(root, api_key)
    if model is None:
        if not models:
            raise LaunchError(f"the server at {root} has no chat model; add one to its model dir or pass --model")
        model = models[0]
    target = Target(root, model, api_key, tuple(models), tiers)
    path = codex_config(env) if tool == "codex" else claude_settings(env) if tool == "claude" else opencode_config(env)
    saved = backup(path)
    WRITERS[tool](target, env)
    print(f"omlx launch: {tool} -> {root} (model {model}); wrote {path}"
          + (f", previous config saved as {saved}" if saved else ""), file=sys.stderr)
    binary = shutil.which(tool, path=env.get("PATH"))
    if binary is None:
        raise LaunchError(f"'{tool}' is not installed (try: {INSTALL[tool]}); its config is written already")
    return subprocess.call([binary, *tool_args], env=child_env(tool, target, env))
