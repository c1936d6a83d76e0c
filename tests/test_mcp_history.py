"""A client that replays a conversation sends back the MCP calls the server ran, in its own
API's shape; each family's parser turns them back into the rounds the model saw: its call,
the result as a tool message, then what it wrote after."""

from __future__ import annotations

import pytest

from omlx.api.anthropic_protocol import parse_messages
from omlx.api.errors import APIError
from omlx.api.openai_protocol import parse_chat
from omlx.api.responses_protocol import parse_responses

USER = {"role": "user", "content": "add 2 and 3"}
CALL = {"id": "c1", "type": "function", "function": {"name": "calc__add", "arguments": {"a": 2, "b": 3}}}
EXPECTED = [
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "thanks"},
]


def test_chat_mcp_tool_calls():
    body = {"model": "m", "messages": [USER, {
        "role": "assistant", "content": "It is 5.",
        "mcp_tool_calls": [{"id": "c1", "type": "function", "server": "calc",
                            "function": {"name": "calc__add", "arguments": '{"a": 2, "b": 3}'},
                            "content": "5", "is_error": False}],
    }, {"role": "user", "content": "thanks"}]}
    assert parse_chat(body).conversation.messages == EXPECTED


def test_anthropic_mcp_blocks():
    body = {"model": "m", "max_tokens": 5, "messages": [USER, {"role": "assistant", "content": [
        {"type": "mcp_tool_use", "id": "c1", "name": "add", "server_name": "calc", "input": {"a": 2, "b": 3}},
        {"type": "mcp_tool_result", "tool_use_id": "c1", "is_error": False, "content": [{"type": "text", "text": "5"}]},
        {"type": "text", "text": "It is 5."},
    ]}, {"role": "user", "content": "thanks"}]}
    assert parse_messages(body).conversation.messages == EXPECTED


def test_anthropic_parallel_calls_and_an_error_result():
    body = {"model": "m", "max_tokens": 5, "messages": [USER, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me see."},
        {"type": "mcp_tool_use", "id": "a", "name": "add", "server_name": "calc", "input": {"a": 1}},
        {"type": "mcp_tool_use", "id": "b", "name": "add", "server_name": "calc", "input": {}},
        {"type": "mcp_tool_result", "tool_use_id": "a", "is_error": True, "content": [{"type": "text", "text": "bad"}]},
        {"type": "mcp_tool_result", "tool_use_id": "b", "content": "ok"},
    ]}]}
    messages = parse_messages(body).conversation.messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Let me see." and [c["id"] for c in messages[1]["tool_calls"]] == ["a", "b"]
    assert messages[2]["content"] == "Error: bad" and messages[3]["content"] == "ok"


def test_responses_mcp_call_items():
    body = {"model": "m", "input": [
        {"type": "message", "role": "user", "content": "add 2 and 3"},
        {"type": "mcp_list_tools", "id": "l", "server_label": "calc", "tools": []},
        {"type": "mcp_call", "id": "c1", "server_label": "calc", "name": "add", "arguments": '{"a": 2, "b": 3}',
         "output": "5", "error": None, "status": "completed"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 5."}]},
        {"type": "message", "role": "user", "content": "thanks"},
    ]}
    assert parse_responses(body).input_messages == EXPECTED


@pytest.mark.parametrize("parse, body", [
    (parse_chat, {"model": "m", "messages": [USER, {"role": "assistant", "content": "", "mcp_tool_calls": {}}]}),
    (parse_chat, {"model": "m", "messages": [USER, {"role": "assistant", "content": "", "mcp_tool_calls": [{"id": "x"}]}]}),
    (parse_messages, {"model": "m", "max_tokens": 5, "messages": [USER, {"role": "assistant", "content": [
        {"type": "mcp_tool_use", "id": "c1", "name": "add", "input": {}}]}]}),
    (parse_responses, {"model": "m", "input": [{"type": "mcp_call", "id": "c1", "name": "add", "arguments": "{}"}]}),
])
def test_malformed_replays_are_400s(parse, body):
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400 and caught.value.param
