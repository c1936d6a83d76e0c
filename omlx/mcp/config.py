"""The MCP config file: which MCP servers to connect to and how.

Two shapes are read, as oMLX reads them: oMLX's own `{"servers": {name: {...}}}` and Claude
Desktop's `{"mcpServers": {name: {...}}}`.  Each server is `stdio` (`command`, `args`, `env`,
`cwd`) or `streamable-http` / `sse` (`url`, `headers`), with `enabled` and `timeout`;
`max_tool_calls` and `default_timeout` sit at the top.  A server without `transport` is stdio
when it has a `command`, HTTP when it has a `url` (Claude Desktop files often say `type`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRANSPORTS = ("stdio", "streamable-http", "sse")
_TRANSPORT_ALIASES = {"http": "streamable-http", "streamable_http": "streamable-http", "streamablehttp": "streamable-http"}
DEFAULT_MAX_TOOL_CALLS = 10
DEFAULT_TIMEOUT_S = 30.0
CONFIG_NAMES = ("mcp.json", "mcp.yaml", "mcp.yml")


class MCPConfigError(ValueError):
    """The config file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class MCPServerConfig:
    name: str
    transport: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    timeout: float = DEFAULT_TIMEOUT_S  # per tool call (and per connection attempt)


@dataclass(frozen=True)
class MCPConfig:
    servers: tuple[MCPServerConfig, ...]
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS
    default_timeout: float = DEFAULT_TIMEOUT_S
    path: Path | None = None


def _string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MCPConfigError(f"{where} must be an object of strings")
    return {k: str(v) for k, v in value.items()}


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MCPConfigError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _server(name: str, raw: Any, default_timeout: float) -> MCPServerConfig:
    where = f"servers.{name}"
    if not isinstance(raw, dict):
        raise MCPConfigError(f"{where} must be an object")
    if "__" in name or not name:
        # Tools are exposed as `<server>__<tool>`: a server name with `__` would be ambiguous.
        raise MCPConfigError(f"{where}: a server name must be non-empty and must not contain '__'")
    transport = raw.get("transport", raw.get("type"))
    if transport is None:
        transport = "stdio" if raw.get("command") else "streamable-http" if raw.get("url") else None
    if isinstance(transport, str):
        transport = _TRANSPORT_ALIASES.get(transport.lower(), transport.lower())
    if transport not in TRANSPORTS:
        raise MCPConfigError(f"{where}.transport must be one of {', '.join(TRANSPORTS)} (or give a command or a url)")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise MCPConfigError(f"{where}.enabled must be true or false")
    timeout = _positive(raw["timeout"], f"{where}.timeout") if raw.get("timeout") is not None else default_timeout
    if transport == "stdio":
        command, args, cwd = raw.get("command"), raw.get("args", []), raw.get("cwd")
        if not isinstance(command, str) or not command:
            raise MCPConfigError(f"{where}.command is required for a stdio server")
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise MCPConfigError(f"{where}.args must be a list of strings")
        if cwd is not None and not isinstance(cwd, str):
            raise MCPConfigError(f"{where}.cwd must be a string")
        return MCPServerConfig(name, transport, command=command, args=tuple(str(a) for a in args),
                               env=_string_map(raw.get("env"), f"{where}.env"), cwd=cwd,
                               enabled=enabled, timeout=timeout)
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise MCPConfigError(f"{where}.url must be an http(s) URL for a {transport} server")
    return MCPServerConfig(name, transport, url=url, headers=_string_map(raw.get("headers"), f"{where}.headers"),
                           enabled=enabled, timeout=timeout)


def parse_config(raw: Any, path: Path | None = None) -> MCPConfig:
    if not isinstance(raw, dict):
        raise MCPConfigError("the MCP config must be a JSON object")
    servers = raw.get("servers", raw.get("mcpServers"))
    if servers is None:
        servers = {}
    if not isinstance(servers, dict):
        raise MCPConfigError("'servers' (or 'mcpServers') must be an object mapping names to servers")
    default_timeout = _positive(raw.get("default_timeout", DEFAULT_TIMEOUT_S), "default_timeout")
    max_calls = raw.get("max_tool_calls", DEFAULT_MAX_TOOL_CALLS)
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
        raise MCPConfigError(f"max_tool_calls must be a non-negative integer, got {max_calls!r}")
    return MCPConfig(
        servers=tuple(_server(name, spec, default_timeout) for name, spec in servers.items()),
        max_tool_calls=max_calls, default_timeout=default_timeout, path=path,
    )


def load_config(path: Path) -> MCPConfig:
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise MCPConfigError(f"cannot read the MCP config {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only YAML configs need PyYAML (a dependency of transformers)

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:
        raise MCPConfigError(f"the MCP config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    try:
        return parse_config(raw, path)
    except MCPConfigError as exc:
        raise MCPConfigError(f"{path}: {exc}") from None


def find_config_path(explicit: str | Path | None, cwd: Path | None = None, home: Path | None = None) -> Path | None:
    """oMLX's search order: the path given (--mcp-config, OMLX_MCP_CONFIG or settings.json's
    mcp.config_path, resolved by the caller), else ./mcp.json|yaml, else
    ~/.config/omlx/mcp.json|yaml.  None when there is none (MCP is then off)."""
    if explicit:
        return Path(explicit).expanduser()
    folders = [cwd or Path.cwd(), (home or Path(os.path.expanduser("~"))) / ".config" / "omlx"]
    for folder in folders:
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None
