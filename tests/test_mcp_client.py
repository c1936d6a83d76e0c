"""MCP client side without the HTTP server: the config file, and connections to real MCP
servers (written with the `mcp` SDK, tests/mcp_servers/) over stdio and streamable HTTP,
through the manager and executor the server uses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from omlx.mcp.client import Timing
from omlx.mcp.config import MCPConfigError, find_config_path, load_config, parse_config
from omlx.mcp.executor import InvalidArguments, MCPExecutor, UnknownTool
from omlx.mcp.manager import MCPManager

from mcp_servers.launch import CHANGING_SERVER, HANG_SERVER, TOOLS_SERVER, http_tools_server, process_alive

# Quick pings and retries; connecting may take its time (this machine is shared and busy).
FAST = Timing(ping_interval=0.5, first_backoff=0.2, max_backoff=1.0, stop_grace=5.0, min_session_timeout=20.0)


# ---------------------------------------------------------------------------- config


def test_both_config_shapes_parse_with_defaults_and_inference():
    omlx_style = parse_config({
        "servers": {
            "files": {"transport": "stdio", "command": "npx", "args": ["-y", "server"], "env": {"K": 1}, "cwd": "/tmp"},
            "web": {"transport": "streamable-http", "url": "http://127.0.0.1:9/mcp", "headers": {"A": "b"},
                    "timeout": 5},
            "old": {"transport": "sse", "url": "https://example.com/sse", "enabled": False},
        },
        "max_tool_calls": 4, "default_timeout": 12,
    })
    files, web, old = omlx_style.servers
    assert (files.transport, files.command, files.args, files.env, files.cwd, files.timeout) == (
        "stdio", "npx", ("-y", "server"), {"K": "1"}, "/tmp", 12.0)
    assert (web.transport, web.url, web.headers, web.timeout) == ("streamable-http", "http://127.0.0.1:9/mcp", {"A": "b"}, 5.0)
    assert (old.transport, old.enabled) == ("sse", False)
    assert (omlx_style.max_tool_calls, omlx_style.default_timeout) == (4, 12.0)

    claude = parse_config({"mcpServers": {"a": {"command": "uvx", "args": ["x"]},
                                          "b": {"type": "http", "url": "http://h/mcp"}, "c": {"url": "http://h/mcp"}}})
    assert [s.transport for s in claude.servers] == ["stdio", "streamable-http", "streamable-http"]
    assert (claude.max_tool_calls, claude.default_timeout) == (10, 30.0)


@pytest.mark.parametrize("raw, message", [
    ([], "must be a JSON object"),
    ({"servers": []}, "'servers'"),
    ({"servers": {"a": {"transport": "carrier-pigeon", "command": "x"}}}, "servers.a.transport"),
    ({"servers": {"a": {"transport": "stdio"}}}, "servers.a.command"),
    ({"servers": {"a": {"transport": "sse", "url": "ftp://x"}}}, "servers.a.url"),
    ({"servers": {"a__b": {"command": "x"}}}, "'__'"),
    ({"servers": {"a": {"command": "x", "timeout": 0}}}, "servers.a.timeout"),
    ({"servers": {"a": {"command": "x", "enabled": "yes"}}}, "servers.a.enabled"),
    ({"servers": {}, "max_tool_calls": -1}, "max_tool_calls"),
])
def test_bad_configs_name_the_field(raw, message):
    with pytest.raises(MCPConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_config(raw)


def test_config_files_json_yaml_and_search_order(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"servers": {"x": {"command": "echo"}}}))
    (tmp_path / "b.yaml").write_text("mcpServers:\n  y:\n    url: http://127.0.0.1:1/mcp\n")
    (tmp_path / "bad.json").write_text("{not json")
    assert load_config(tmp_path / "a.json").servers[0].name == "x"
    assert load_config(tmp_path / "b.yaml").servers[0].transport == "streamable-http"
    with pytest.raises(MCPConfigError, match="not valid json"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(MCPConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    (home / ".config" / "omlx").mkdir(parents=True)
    cwd.mkdir()
    assert find_config_path(None, cwd, home) is None
    (home / ".config" / "omlx" / "mcp.yaml").write_text("servers: {}\n")
    assert find_config_path(None, cwd, home) == home / ".config" / "omlx" / "mcp.yaml"
    (cwd / "mcp.json").write_text("{}")
    assert find_config_path(None, cwd, home) == cwd / "mcp.json"
    assert find_config_path("/explicit.json", cwd, home) == Path("/explicit.json")


# ---------------------------------------------------------------------------- live servers


async def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def http_server():
    with http_tools_server() as url:
        yield url


def _manager(http_url: str, timing: Timing = FAST, timeout: float = 3, **extra) -> MCPManager:
    servers = {
        "local": {"command": sys.executable, "args": [str(TOOLS_SERVER), "stdio"], "timeout": timeout,
                  "env": {"MCP_TEST_VAR": "from-config"}},
        "remote": {"transport": "streamable-http", "url": http_url, "timeout": timeout},
        **extra,
    }
    return MCPManager(parse_config({"servers": servers}), timing)


@pytest.mark.slow
async def test_list_execute_validate_over_stdio_and_http(http_server, monkeypatch):
    monkeypatch.setenv("OMLX_TEST_SECRET", "s3cret")  # this process's environment: not the server's
    manager = _manager(http_server)
    manager.start()
    try:
        await _wait_for(lambda: all(s["state"] == "connected" for s in manager.servers()))
        servers = {s["name"]: s for s in manager.servers()}
        assert servers["local"] == {"name": "local", "state": "connected", "transport": "stdio",
                                    "tools_count": 6, "error": None}
        assert servers["remote"]["transport"] == "streamable-http" and servers["remote"]["tools_count"] == 6
        names = {t.qualified_name for t in manager.tools()}
        assert {"local__add", "remote__add", "local__echo", "remote__slow"} <= names
        add = manager.tool("remote__add")
        assert add.input_schema["required"] == ["a", "b"] and add.listing()["server"] == "remote"

        executor = MCPExecutor(manager)
        for name in ("local__add", "remote__add"):
            result = await executor.execute(name, {"a": 2, "b": 40})
            assert (result.content, result.is_error, result.error_message) == ("42", False, None)
        with pytest.raises(InvalidArguments, match="'b' is a required property"):
            await executor.execute("local__add", {"a": 1})
        with pytest.raises(InvalidArguments, match="at a: 'x' is not of type 'integer'"):
            await executor.execute("remote__add", {"a": "x", "b": 1})
        with pytest.raises(UnknownTool, match="nope__add"):
            await executor.execute("nope__add", {})
        assert (await executor.execute("local__getenv", {"name": "MCP_TEST_VAR"})).content == "from-config"
        assert (await executor.execute("local__getenv", {"name": "OMLX_TEST_SECRET"})).content == ""
        assert (await executor.execute("local__getenv", {"name": "PATH"})).content == os.environ["PATH"]
        failed = await executor.execute("local__fail", {"reason": "testing"})
        assert failed.is_error and "failed on purpose: testing" in failed.content
    finally:
        await manager.stop()


@pytest.mark.parametrize("notify", [True, False])
@pytest.mark.slow
async def test_tool_list_changes_are_picked_up(notify):
    """Notified: at once (`tools/list_changed`).  Not notified: at the next periodic listing
    (shortened here from minutes)."""
    timing = FAST if notify else dataclasses.replace(FAST, tools_refresh=1.0)
    manager = MCPManager(parse_config({"servers": {"changing": {
        "command": sys.executable, "args": [str(CHANGING_SERVER), "stdio"], "timeout": 10}}}), timing)
    manager.start()
    try:
        await _wait_for(lambda: manager.servers()[0]["state"] == "connected")
        assert [t.qualified_name for t in manager.tools()] == ["changing__add_tool"]
        executor = MCPExecutor(manager)
        added = await executor.execute("changing__add_tool", {"name": "zap", "notify": notify})
        assert added.content == "added zap"
        await _wait_for(lambda: manager.tool("changing__zap") is not None, timeout=15.0)
        assert (await executor.execute("changing__zap", {})).content == "zap ran"
        assert manager.servers()[0]["tools_count"] == 2 and manager.servers()[0]["state"] == "connected"
    finally:
        await manager.stop()


@pytest.mark.slow
async def test_slow_tool_times_out_and_the_connection_survives(http_server):
    manager = _manager(http_server)
    manager.start()
    try:
        await _wait_for(lambda: all(s["state"] == "connected" for s in manager.servers()))
        executor = MCPExecutor(manager)
        results = await asyncio.gather(*(executor.execute(n, {"seconds": 30}) for n in ("local__slow", "remote__slow")))
        for result in results:
            assert result.is_error and "did not answer within 3 s" in result.error_message
        for name in ("local__echo", "remote__echo"):
            assert (await executor.execute(name, {"text": "still here"})).content == "echo: still here"
    finally:
        await manager.stop()


@pytest.mark.slow
async def test_a_killed_server_is_reported_retried_and_the_others_keep_working(http_server):
    manager = _manager(http_server)
    manager.start()
    try:
        await _wait_for(lambda: all(s["state"] == "connected" for s in manager.servers()))
        executor = MCPExecutor(manager)
        pid = int((await executor.execute("local__pid", {})).content)
        os.kill(pid, signal.SIGKILL)
        await _wait_for(lambda: manager.connection("local").state != "connected")
        local = manager.connection("local").status()
        assert local["state"] in ("failed", "connecting") and local["error"]
        # Its tools are gone from the registry; the other server's still answer.
        assert not any(t.server == "local" for t in manager.tools())
        assert (await executor.execute("remote__add", {"a": 1, "b": 1})).content == "2"
        # A call to it is an error result, not an exception: a model can be told.
        down = await executor.execute_for_model("local__add", {"a": 1, "b": 1})
        assert down.is_error
        # It comes back by itself, as a new process.
        await _wait_for(lambda: manager.connection("local").state == "connected")
        new_pid = int((await executor.execute("local__pid", {})).content)
        assert new_pid != pid and manager.connection("local").attempts >= 2
    finally:
        await manager.stop()


@pytest.mark.slow
async def test_broken_and_hanging_servers_never_block_the_others(http_server):
    # A hanging server's attempts end after its own 0.5 s; the others get 20 s to connect.
    hang_timing = Timing(ping_interval=0.5, first_backoff=0.2, max_backoff=1.0, min_session_timeout=0.0)
    manager = _manager(http_server, hang_timing, 20, missing={"command": "/nonexistent/mcp-server"},
                       hangs={"command": sys.executable, "args": [str(HANG_SERVER)], "timeout": 0.5},
                       off={"command": "/nonexistent/never-started", "enabled": False})
    started = time.monotonic()
    manager.start()
    assert time.monotonic() - started < 1.0  # starting spawns nothing synchronously
    try:
        await _wait_for(lambda: manager.connection("local").state == "connected"
                        and manager.connection("remote").state == "connected")
        await _wait_for(lambda: manager.connection("missing").attempts >= 2 and manager.connection("hangs").attempts >= 2)
        status = {s["name"]: s for s in manager.servers()}
        assert status["missing"]["state"] in ("failed", "connecting") and status["missing"]["error"]
        assert status["hangs"]["state"] in ("failed", "connecting") and status["hangs"]["error"]
        assert status["off"] == {"name": "off", "state": "disabled", "transport": "stdio", "tools_count": 0, "error": None}
        assert (await MCPExecutor(manager).execute("local__add", {"a": 3, "b": 4})).content == "7"
    finally:
        await manager.stop()


@pytest.mark.slow
async def test_stop_ends_stdio_server_processes(http_server):
    manager = _manager(http_server)
    manager.start()
    await _wait_for(lambda: manager.connection("local").state == "connected")
    pid = int((await MCPExecutor(manager).execute("local__pid", {})).content)
    assert process_alive(pid)
    await manager.stop()
    await _wait_for(lambda: not process_alive(pid), timeout=10)
    assert [s["state"] for s in manager.servers()] == ["closed", "closed"]


async def test_stop_interrupts_a_hanging_connection_attempt(tmp_path):
    pid_file = tmp_path / "pid"
    manager = MCPManager(parse_config({"servers": {"hangs": {
        "command": sys.executable, "args": [str(HANG_SERVER), str(pid_file)], "timeout": 60}}}), FAST)
    manager.start()
    await _wait_for(lambda: pid_file.exists() and pid_file.read_text())
    pid = int(pid_file.read_text())
    assert manager.connection("hangs").state == "connecting"
    started = time.monotonic()
    await manager.stop()
    assert time.monotonic() - started < FAST.stop_grace  # not the 60 s initialize timeout
    await _wait_for(lambda: not process_alive(pid), timeout=10)


@pytest.mark.slow
async def test_sse_transport(tmp_path):
    with http_tools_server("sse") as url:
        manager = MCPManager(parse_config({"servers": {"old": {"transport": "sse", "url": url}}}), FAST)
        manager.start()
        try:
            await _wait_for(lambda: manager.connection("old").state == "connected")
            assert manager.servers()[0]["transport"] == "sse"
            assert (await MCPExecutor(manager).execute("old__add", {"a": 20, "b": 22})).content == "42"
        finally:
            await manager.stop()
