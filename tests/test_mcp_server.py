"""MCP through a running `omlx serve --mcp-config`: the /v1/mcp routes, and generations in
which the model calls an MCP tool that the server runs and feeds back (chat completions,
Anthropic messages, Responses; through the official SDKs).

The tiny random-weight model makes the call because `tool_choice` names the MCP tool (the
call is grammar-forced); what it writes after reading the result is random, but the rounds,
their order, the executed call's result and the usage over both rounds are checked exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anthropic
import openai
import pytest
from conftest import tokenizer_of
from omlx_process import call, omlx_server

from mcp_servers.launch import TOOLS_SERVER, http_tools_server, process_alive

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "add two numbers for me"}]
FORCE_CHAT = {"type": "function", "function": {"name": "local__add"}}


@pytest.fixture(scope="module")
def mcp_server(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mcp-server")
    with http_tools_server() as url:
        config = workdir / "mcp.json"
        config.write_text(json.dumps({
            "mcpServers": {
                "local": {"command": sys.executable, "args": [str(TOOLS_SERVER), "stdio"], "timeout": 5},
                "remote": {"type": "http", "url": url, "timeout": 5},
                "broken": {"command": "/nonexistent/mcp-server"},
            },
            "max_tool_calls": 3,
        }))
        with omlx_server(model_dir, workdir, "--mcp-config", str(config), "--kv-cache-gb", "0.05",
                         failure=pytest.fail) as running:
            _wait_connected(running, {"local", "remote"})
            yield running


def _wait_connected(running, names, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        status, body = call(running, "GET", "/v1/mcp/servers")
        states = {s["name"]: s["state"] for s in body["servers"]} if status == 200 else {}
        if all(states.get(n) == "connected" for n in names):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"MCP servers not connected: {states}\n{running.log_tail()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def oai(mcp_server):
    with openai.OpenAI(base_url=mcp_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def claude(mcp_server):
    with anthropic.Anthropic(base_url=mcp_server.root, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _listing(server) -> list[dict]:
    status, body = call(server, "GET", "/v1/mcp/tools")
    assert status == 200
    return body["tools"]


def _prompt_tokens(server, messages: list[dict]) -> int:
    """What the server's chat template renders for `messages` with the MCP tools offered."""
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["parameters"]}} for t in _listing(server)]
    return len(tokenizer_of(server.model_path(MODEL)).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True))


def _expected_prompt_tokens(server, call_id: str, arguments: dict, result: str, first_text: str = "") -> int:
    """Both rounds' prompts: the request's, then with the assistant's call and its result."""
    round_two = MESSAGES + [
        {"role": "assistant", "content": first_text,
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "local__add", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "name": "local__add", "content": result},
    ]
    return _prompt_tokens(server, MESSAGES) + _prompt_tokens(server, round_two)


# ---------------------------------------------------------------------------- routes


def test_servers_and_tools_listing(mcp_server):
    status, body = call(mcp_server, "GET", "/v1/mcp/servers")
    assert status == 200
    servers = {s["name"]: s for s in body["servers"]}
    assert set(servers) == {"local", "remote", "broken"}
    assert servers["local"] == {"name": "local", "state": "connected", "transport": "stdio", "tools_count": 6, "error": None}
    assert servers["remote"]["transport"] == "streamable-http" and servers["remote"]["tools_count"] == 6
    assert servers["broken"]["state"] in ("failed", "connecting") and servers["broken"]["error"]

    status, body = call(mcp_server, "GET", "/v1/mcp/tools")
    assert status == 200 and body["count"] == len(body["tools"]) == 12
    add = next(t for t in body["tools"] if t["name"] == "remote__add")
    assert set(add) == {"name", "description", "server", "parameters"}
    assert add["server"] == "remote" and add["description"] == "Add two integers and return the sum."
    assert add["parameters"]["required"] == ["a", "b"]
    health = mcp_server.health()["mcp"]
    assert health == {"servers": 3, "connected": 2, "tools": 12}


def test_execute(mcp_server):
    ok = call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "remote__add", "arguments": {"a": 5, "b": 6}})
    assert ok == (200, {"tool_name": "remote__add", "content": "11", "is_error": False, "error_message": None})
    alias = call(mcp_server, "POST", "/v1/mcp/execute", {"tool": "local__echo", "arguments": {"text": "hi"}})
    assert alias[1]["content"] == "echo: hi"
    status, body = call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "local__fail", "arguments": {"reason": "why"}})
    assert status == 200 and body["is_error"] is True and "failed on purpose: why" in body["error_message"]
    status, body = call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "local__slow", "arguments": {"seconds": 30}})
    assert status == 200 and body["is_error"] is True and "did not answer within 5 s" in body["error_message"]


@pytest.mark.parametrize("body, status, param", [
    ({"tool_name": "local__add", "arguments": {"a": 1}}, 400, "arguments"),
    ({"tool_name": "local__add", "arguments": {"a": 1, "b": "two"}}, 400, "arguments"),
    ({"tool_name": "local__add", "arguments": [1, 2]}, 400, "arguments"),
    ({"tool_name": "nowhere__add", "arguments": {}}, 404, "tool_name"),
    ({"arguments": {}}, 400, "tool_name"),
    ([1, 2], 400, None),
    (b"{not json", 400, None),
])
def test_execute_rejects_bad_calls_before_running_them(mcp_server, body, status, param):
    got, reply = call(mcp_server, "POST", "/v1/mcp/execute", body)
    assert got == status and reply["error"]["param"] == param and reply["error"]["message"]


def test_routes_answer_503_without_an_mcp_config(server):
    for method, path, body in (("GET", "/v1/mcp/servers", None), ("GET", "/v1/mcp/tools", None),
                               ("POST", "/v1/mcp/execute", {"tool_name": "a__b", "arguments": {}})):
        status, reply = call(server, method, path, body)
        assert status == 503 and reply["error"]["code"] == "mcp_not_configured"


# ---------------------------------------------------------------------------- chat completions


def test_chat_runs_the_mcp_call_and_continues(mcp_server, oai):
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice=FORCE_CHAT,
                                        max_tokens=60, temperature=0)
    message = reply.choices[0].message
    assert not message.tool_calls  # nothing for the client to run
    (executed,) = message.model_extra["mcp_tool_calls"]
    arguments = json.loads(executed["function"]["arguments"])
    assert executed["function"]["name"] == "local__add" and executed["server"] == "local"
    assert executed["content"] == str(arguments["a"] + arguments["b"]) and executed["is_error"] is False
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens == _expected_prompt_tokens(mcp_server, executed["id"], arguments, executed["content"])
    assert usage.completion_tokens <= 60 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_shows_the_call_then_its_result_then_the_text(mcp_server, oai):
    stream = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice=FORCE_CHAT, max_tokens=60,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    order, calls, usage, text = [], {}, None, ""
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for entry in (delta.model_extra or {}).get("mcp_tool_calls") or []:
            calls.setdefault(entry["index"], {}).update(entry)
            order.append("result" if "content" in entry else "call")
        if delta.content:
            text += delta.content
            order.append("text")
        assert not delta.tool_calls
    assert order[:2] == ["call", "result"] and set(order[2:]) <= {"text"}
    executed = calls[0]
    arguments = json.loads(executed["function"]["arguments"])
    assert executed["content"] == str(arguments["a"] + arguments["b"])
    assert usage.prompt_tokens == _expected_prompt_tokens(mcp_server, executed["id"], arguments, executed["content"])
    assert 0 < usage.completion_tokens <= 60


def test_the_tool_loops_usage_has_plain_chats_fields(mcp_server, oai):
    """The MCP loop streams through chat's own formatter: its usage chunk carries
    completion_tokens_details (and every other field) as a plain chat stream's does."""

    def final_usage(**kwargs):
        stream = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                             stream=True, stream_options={"include_usage": True}, **kwargs)
        usages = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usages) == 1
        return usages[0].model_dump()

    plain = final_usage(extra_body={"expose_mcp_tools": False})
    looped = final_usage(tool_choice=FORCE_CHAT)
    assert set(looped) == set(plain)
    details = looped["completion_tokens_details"]
    assert details is not None and plain["completion_tokens_details"] is not None
    assert set(details) == set(plain["completion_tokens_details"])
    assert details["accepted_prediction_tokens"] == 0 and details["rejected_prediction_tokens"] == 0
    assert looped["prompt_tokens_details"]["cached_tokens"] >= 0
    whole = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice=FORCE_CHAT, max_tokens=20,
                                        temperature=0)
    assert whole.usage.model_dump()["completion_tokens_details"] == details


def test_a_client_tool_of_the_same_name_wins(mcp_server, oai):
    mine = {"type": "function", "function": {"name": "local__add", "description": "the client's own",
                                             "parameters": {"type": "object", "properties": {"x": {"type": "string"}},
                                                            "required": ["x"]}}}
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[mine], tool_choice=FORCE_CHAT,
                                        max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and "mcp_tool_calls" not in choice.message.model_extra
    (made,) = choice.message.tool_calls
    assert made.function.name == "local__add" and set(json.loads(made.function.arguments)) == {"x"}


def test_requests_can_opt_out(mcp_server, oai):
    with pytest.raises(openai.BadRequestError, match="no tools were given"):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice=FORCE_CHAT, max_tokens=5,
                                    extra_body={"expose_mcp_tools": False})
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                        extra_body={"expose_mcp_tools": False})
    assert reply.usage.prompt_tokens == len(tokenizer_of(mcp_server.model_path(MODEL)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True))  # no tools rendered


# ---------------------------------------------------------------------------- Anthropic messages


def test_messages_show_mcp_tool_use_and_result_blocks(mcp_server, claude):
    message = claude.messages.create(model=MODEL, max_tokens=60, messages=MESSAGES, extra_body={"temperature": 0},
                                     tool_choice={"type": "tool", "name": "local__add"})
    blocks = [b.to_dict() for b in message.content]
    use, result = blocks[0], blocks[1]
    assert use["type"] == "mcp_tool_use" and use["name"] == "add" and use["server_name"] == "local"
    assert result == {"type": "mcp_tool_result", "tool_use_id": use["id"], "is_error": False,
                      "content": [{"type": "text", "text": str(use["input"]["a"] + use["input"]["b"])}]}
    assert all(b["type"] in ("text", "thinking") for b in blocks[2:])
    assert message.stop_reason in ("end_turn", "max_tokens")
    prompt = _expected_prompt_tokens(mcp_server, use["id"], use["input"], result["content"][0]["text"])
    # count_tokens counts the first round's prompt, MCP tools included.
    assert claude.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens == _prompt_tokens(mcp_server, MESSAGES)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt
    assert 0 < message.usage.output_tokens <= 60
    # Replayed as history, the rounds render as the model saw them.
    follow_up = MESSAGES + [{"role": "assistant", "content": blocks}, {"role": "user", "content": "thanks"}]
    again = claude.messages.create(model=MODEL, max_tokens=2, messages=follow_up, extra_body={"expose_mcp_tools": False})
    text = "".join(b["text"] for b in blocks[2:] if b["type"] == "text")
    seen = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": use["id"], "type": "function", "function": {"name": "local__add", "arguments": use["input"]}}]},
        {"role": "tool", "tool_call_id": use["id"], "content": result["content"][0]["text"]},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "thanks"},
    ]
    if any(b["type"] == "thinking" for b in blocks[2:]):
        seen[3]["reasoning_content"] = "".join(b["thinking"] for b in blocks[2:] if b["type"] == "thinking")
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == len(
        tokenizer_of(mcp_server.model_path(MODEL)).apply_chat_template(seen, add_generation_prompt=True, tokenize=True))


def test_messages_stream_through_the_beta_sdk_types(mcp_server, claude):
    with claude.beta.messages.stream(model=MODEL, max_tokens=60, messages=MESSAGES, extra_body={"temperature": 0},
                                     tool_choice={"type": "tool", "name": "remote__add"}) as stream:
        kinds = [e.content_block.type for e in stream if e.type == "content_block_start"]
        final = stream.get_final_message()
    assert kinds[:2] == ["mcp_tool_use", "mcp_tool_result"]
    use, result = final.content[0], final.content[1]
    assert type(use).__name__ == "BetaMCPToolUseBlock" and use.server_name == "remote" and use.name == "add"
    assert type(result).__name__ == "BetaMCPToolResultBlock" and result.tool_use_id == use.id
    assert result.content[0].text == str(use.input["a"] + use.input["b"])
    assert final.usage.output_tokens <= 60


# ---------------------------------------------------------------------------- Responses


def test_responses_stream_an_mcp_call_item(mcp_server, oai):
    stream = oai.responses.create(model=MODEL, input="add two numbers for me", max_output_tokens=60,
                                  tool_choice={"type": "function", "name": "local__echo"}, temperature=0, stream=True)
    events = [e.type for e in stream]
    assert "response.mcp_call.completed" in events and events[-1] in ("response.completed", "response.incomplete")
    assert events.index("response.mcp_call_arguments.done") < events.index("response.mcp_call.completed")
    response = oai.responses.create(model=MODEL, input="add two numbers for me", max_output_tokens=60,
                                    tool_choice={"type": "function", "name": "local__echo"}, temperature=0)
    item = response.output[0]
    assert (item.type, item.server_label, item.name, item.status) == ("mcp_call", "local", "echo", "completed")
    assert item.output == "echo: " + json.loads(item.arguments)["text"]
    assert response.tools == []  # only the client's tools are echoed back
    assert response.usage.output_tokens <= 60
    # The stored conversation holds the executed round: a follow-up renders it.
    follow = oai.responses.create(model=MODEL, input="and again", previous_response_id=response.id,
                                  max_output_tokens=4, temperature=0, extra_body={"expose_mcp_tools": False})
    stored = [
        {"role": "user", "content": "add two numbers for me"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "local__echo", "arguments": json.loads(item.arguments)}}]},
        {"role": "tool", "tool_call_id": "x", "name": "local__echo", "content": item.output},
        {"role": "assistant", "content": response.output_text},
        {"role": "user", "content": "and again"},
    ]
    assert follow.usage.input_tokens == len(tokenizer_of(mcp_server.model_path(MODEL)).apply_chat_template(
        stored, add_generation_prompt=True, tokenize=True))


# ---------------------------------------------------------------------------- failures


def test_a_killed_mcp_server_is_reported_and_the_others_keep_working(mcp_server, oai):
    pid = int(call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "local__pid", "arguments": {}})[1]["content"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        local = next(s for s in call(mcp_server, "GET", "/v1/mcp/servers")[1]["servers"] if s["name"] == "local")
        if local["state"] != "connected" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Reported (it comes back after a one-second backoff).
    assert local["state"] in ("failed", "connecting") and local["error"]
    assert call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "remote__add", "arguments": {"a": 1, "b": 2}})[1]["content"] == "3"
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "remote__add"}})
    assert reply.choices[0].message.model_extra["mcp_tool_calls"][0]["is_error"] is False
    _wait_connected(mcp_server, {"local"})
    new_pid = call(mcp_server, "POST", "/v1/mcp/execute", {"tool_name": "local__pid", "arguments": {}})[1]["content"]
    assert int(new_pid) != pid


def test_round_limit_and_shutdown_without_leftover_processes(model_dir, tmp_path):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"servers": {
        "one": {"command": sys.executable, "args": [str(TOOLS_SERVER), "stdio"]},
        "two": {"command": sys.executable, "args": [str(TOOLS_SERVER), "stdio"]},
    }, "max_tool_calls": 1}))
    # OMLX_MCP_CONFIG: the env name oMLX reads, instead of --mcp-config.
    with omlx_server(model_dir, tmp_path, env={"OMLX_MCP_CONFIG": str(config)}, failure=pytest.fail) as running:
        _wait_connected(running, {"one", "two"})
        # With one round allowed, the round that reads the result is not offered the MCP tools.
        with openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120) as oai:
            reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                                tool_choice={"type": "function", "function": {"name": "one__add"}})
        (executed,) = reply.choices[0].message.model_extra["mcp_tool_calls"]
        arguments = json.loads(executed["function"]["arguments"])
        round_two = MESSAGES + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": executed["id"], "type": "function", "function": {"name": "one__add", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": executed["id"], "content": executed["content"]},
        ]
        tokenizer = tokenizer_of(running.model_path(MODEL))
        assert reply.usage.prompt_tokens == _prompt_tokens(running, MESSAGES) + len(
            tokenizer.apply_chat_template(round_two, add_generation_prompt=True, tokenize=True))
        pids = [int(call(running, "POST", "/v1/mcp/execute", {"tool_name": f"{n}__pid", "arguments": {}})[1]["content"])
                for n in ("one", "two")]
        assert all(process_alive(p) for p in pids)
    assert running.process.returncode is not None
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in pids)


@pytest.mark.slow
def test_a_broken_config_stops_the_server_with_the_reason(model_dir, tmp_path):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"servers": {"x": {"transport": "stdio"}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    done = subprocess.run([sys.executable, "-m", "omlx", "serve", "--model-dir", str(model_dir), "--no-demo",
                           "--mcp-config", str(config)], env={**env, "OMLX_HOME": str(tmp_path / "home")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{config}: servers.x.command is required for a stdio server" in done.stderr
