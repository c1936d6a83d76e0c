"""omlx as a drop-in for oMLX and the mlx-vlm server, on one real server.

Its OMLX_HOME holds an oMLX user's settings files exactly as oMLX writes them; every
documented example in ../shared/reference (oMLX's models / status / health / load / unload,
LM Studio's model records, the mlx-vlm server's routes, fields and /unload) gets the shape
its documentation shows; the settings reach all three chat-style APIs; `omlx launch` writes
configs the tools read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
from conftest import SCRIPTED, reference_greedy, tokenizer_of
from omlx_process import call, omlx_server

from omlx.testing.lora import build_lora_adapter

MESSAGES = [{"role": "user", "content": "tell me about the river"}]
ALIAS = "alpha"  # model "tiny"'s model_alias
MAX_CONTEXT = 256  # model "tiny"'s max_context_window
MODEL_MAX_TOKENS = 6  # model "tiny"'s max_tokens
GLOBAL_MAX_TOKENS = 5  # sampling.max_tokens in settings.json
PENALTY = 5.0  # model "tiny"'s repetition_penalty: strong enough to change 6 greedy tokens
GLOBAL_TEMPERATURE = 1.7  # above Anthropic's range: must never fail an Anthropic request

OMLX_SETTINGS = {
    "version": "1.0",
    "server": {"host": "127.0.0.1", "port": 8000, "log_level": "info"},
    "model": {"model_dirs": [], "model_fallback": False},
    "scheduler": {"max_concurrent_requests": 6},
    "cache": {"enabled": True, "ssd_cache_max_size": "auto", "hot_cache_only": True},
    "auth": {"api_key": None, "skip_api_key_verification": False, "sub_keys": []},
    "mcp": {"config_path": None},
    "huggingface": {"endpoint": "", "hf_cache_enabled": False},
    # presence_penalty 3.0 is outside every API's range (and the engine's): ignored, never a 400.
    "sampling": {"max_context_window": 32768, "max_tokens": GLOBAL_MAX_TOKENS, "temperature": GLOBAL_TEMPERATURE,
                 "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0, "presence_penalty": 3.0},
    "idle_timeout": {"idle_timeout_seconds": None},
}
OMLX_MODEL_SETTINGS = {
    "version": 1,
    "models": {
        "tiny": {
            "model_alias": ALIAS, "is_pinned": True, "max_context_window": MAX_CONTEXT,
            "max_tokens": MODEL_MAX_TOKENS, "temperature": 0.0, "repetition_penalty": PENALTY,
            "enable_thinking": False, "is_favorite": True, "dflash_enabled": False,
        },
        # force_sampling: the model's temperature wins over the client's.
        "tiny-llama": {"force_sampling": True, "temperature": 0.0, "ttl_seconds": 3600,
                       "model_type_override": "llm", "trust_remote_code": False},
    },
}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drop-in")
    home = workdir / "home"
    home.mkdir()
    (home / "settings.json").write_text(json.dumps(OMLX_SETTINGS))
    (home / "model_settings.json").write_text(json.dumps(OMLX_MODEL_SETTINGS))
    # The mlx-vlm server's startup env: a model and a LoRA adapter for it, loaded at once.
    preload = build_lora_adapter(model_dir / "tiny-llama", workdir / "preload-lora", seed=1)
    env = {"PRELOAD_MODEL": "tiny-llama", "PRELOAD_ADAPTER": str(preload)}
    with omlx_server(model_dir, workdir, "--kv-cache-gb", "0.02", env=env, failure=pytest.fail) as running:
        running.home = home
        running.workdir = workdir
        yield running


def no_eos(model_dir: Path, name: str) -> dict:
    eos = json.loads((model_dir / name / "config.json").read_text())["eos_token_id"]
    return {str(eos): -100}


def post(server, path: str, body: dict) -> dict:
    code, reply = call(server, "POST", path, body)
    assert code == 200, reply
    return reply


def sse_events(server, path: str, body: dict) -> list[tuple[str | None, str]]:
    """(event name, data) of a streamed reply."""
    import urllib.request

    request = urllib.request.Request(server.root + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    events, name = [], None
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, line[6:]))
                name = None
    return events


def message_text(reply: dict) -> str:
    return "".join(b["text"] for b in reply["content"] if b["type"] == "text")


def response_text(reply: dict) -> str:
    return "".join(p["text"] for item in reply["output"] if item["type"] == "message" for p in item["content"])


# ---------------------------------------------------------------------------- oMLX's documented examples


def test_models_list_as_documented(server):
    code, body = call(server, "GET", "/v1/models")
    assert code == 200 and body["object"] == "list"
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model" and isinstance(model["created"], int) and model["owned_by"] == "omlx"
    ids = {m["id"] for m in body["data"]}
    assert ALIAS in ids and "tiny" not in ids  # the alias is the id once one is set
    assert {"tiny-llama", SCRIPTED} <= ids


def test_models_status_as_documented(server):
    code, body = call(server, "GET", "/v1/models/status")
    assert code == 200 and isinstance(body["models"], list)
    for model in body["models"]:
        assert isinstance(model["id"], str)
        assert model["model_type"] in ("llm", "vlm", "ocr", "embedding", "reranker")
        assert isinstance(model["loaded"], bool)
        assert isinstance(model["max_context_window"], int) and isinstance(model["max_tokens"], int)
    models = {m["id"]: m for m in body["models"]}
    tiny = models["tiny"]
    assert tiny["alias"] == ALIAS and tiny["loaded"] is True  # is_pinned: loaded at startup
    assert tiny["max_context_window"] == MAX_CONTEXT and tiny["max_tokens"] == MODEL_MAX_TOKENS
    assert models["tiny-llama"]["ttl"] == 3600 and models["tiny-llama"]["model_type"] == "llm"
    assert models[SCRIPTED]["max_tokens"] == GLOBAL_MAX_TOKENS


def test_health_as_documented(server):
    code, body = call(server, "GET", "/health")
    assert code == 200 and body["status"] == "ok"
    # The mlx-vlm server's fields: PRELOAD_MODEL + PRELOAD_ADAPTER were loaded last.
    assert body["loaded_model"] == "tiny-llama"
    assert body["loaded_adapter"] == str((server.workdir / "preload-lora").resolve())


def test_load_and_unload_as_documented(server):
    for name in (SCRIPTED, "tiny-llama"):
        code, body = call(server, "POST", f"/v1/models/{name}/load")
        assert code == 200 and body["loaded"] is True and body["id"] == name
    code, body = call(server, "POST", "/v1/models/tiny-llama/unload")
    assert code == 200 and body["loaded"] is False
    code, body = call(server, "POST", f"/v1/models/{ALIAS}/load")  # by alias
    assert code == 200 and body["id"] == "tiny"


def test_lmstudio_model_records_as_documented(server):
    code, body = call(server, "GET", "/api/v1/models")
    assert code == 200
    record = {m["key"]: m for m in body["models"]}["tiny"]
    assert {"type", "publisher", "key", "display_name", "architecture", "quantization", "size_bytes",
            "params_string", "loaded_instances", "max_context_length", "format", "capabilities"} <= set(record)
    # scheduler.max_concurrent_requests from oMLX's settings.json reached the engine.
    assert record["loaded_instances"][0]["config"]["max_concurrent_predictions"] == 6


# ---------------------------------------------------------------------------- oMLX settings through the APIs


def test_model_settings_reach_all_three_chat_apis(server, model_dir):
    """tiny: alias, max_tokens 6, temperature 0, repetition_penalty 1.3, enable_thinking false."""
    bias = no_eos(model_dir, "tiny")
    thinking_off = tokenizer_of(model_dir / "tiny").apply_chat_template(
        MESSAGES, add_generation_prompt=True, enable_thinking=False)
    chat = post(server, "/v1/chat/completions", {"model": ALIAS, "messages": MESSAGES, "logit_bias": bias})
    responses = post(server, "/v1/responses", {"model": ALIAS, "input": MESSAGES, "logit_bias": bias})
    messages = post(server, "/v1/messages", {"model": ALIAS, "messages": MESSAGES, "logit_bias": bias,
                                             "max_tokens": MODEL_MAX_TOKENS})
    assert chat["model"] == "tiny" and chat["usage"]["completion_tokens"] == MODEL_MAX_TOKENS
    assert responses["usage"]["output_tokens"] == MODEL_MAX_TOKENS  # max_tokens reaches /v1/responses
    assert chat["usage"]["prompt_tokens"] == len(thinking_off)
    assert responses["usage"]["input_tokens"] == len(thinking_off)
    usage = messages["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(thinking_off)
    # Greedy with the repetition penalty from the settings, the same on every API.
    text = chat["choices"][0]["message"]["content"]
    assert response_text(responses) == text and message_text(messages) == text
    explicit = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "logit_bias": bias,
                                                     "temperature": 0, "repetition_penalty": PENALTY})
    assert explicit["choices"][0]["message"]["content"] == text
    # The penalty did something: over a longer answer a greedy random model repeats itself.
    long = {"model": ALIAS, "messages": MESSAGES, "logit_bias": bias, "max_tokens": 40}
    penalized = post(server, "/v1/chat/completions", long)["choices"][0]["message"]["content"]
    plain = post(server, "/v1/chat/completions", {**long, "repetition_penalty": 1.0})["choices"][0]["message"]
    assert plain["content"] != penalized


def test_force_sampling_pins_the_models_temperature_on_every_api(server, model_dir):
    path = model_dir / "tiny-llama"
    prompt_ids = tokenizer_of(path).apply_chat_template(MESSAGES, add_generation_prompt=True)
    bias = no_eos(model_dir, "tiny-llama")
    want, _ = reference_greedy(path, list(prompt_ids), GLOBAL_MAX_TOKENS)
    want_text = tokenizer_of(path).decode(want)
    chat = post(server, "/v1/chat/completions", {"model": "tiny-llama", "messages": MESSAGES, "temperature": 1.9,
                                                 "seed": 3, "logit_bias": bias})
    responses = post(server, "/v1/responses", {"model": "tiny-llama", "input": MESSAGES, "temperature": 1.9,
                                               "seed": 3, "logit_bias": bias})
    messages = post(server, "/v1/messages", {"model": "tiny-llama", "messages": MESSAGES, "temperature": 1.0,
                                             "seed": 3, "logit_bias": bias, "max_tokens": GLOBAL_MAX_TOKENS})
    assert chat["choices"][0]["message"]["content"] == want_text
    assert response_text(responses) == want_text and message_text(messages) == want_text


def test_a_global_default_outside_an_apis_range_never_fails_it(server, model_dir):
    """settings.json: temperature 1.7 (Anthropic allows up to 1), presence_penalty 3.0 (no API
    allows it); neither is the client's doing, so no request fails for them."""
    bias = no_eos(model_dir, SCRIPTED)
    chat = post(server, "/v1/chat/completions", {"model": SCRIPTED, "messages": MESSAGES, "logit_bias": bias})
    assert chat["usage"]["completion_tokens"] == GLOBAL_MAX_TOKENS
    responses = post(server, "/v1/responses", {"model": SCRIPTED, "input": "hi", "logit_bias": bias})
    assert responses["temperature"] == GLOBAL_TEMPERATURE and responses["usage"]["output_tokens"] == GLOBAL_MAX_TOKENS
    post(server, "/v1/completions", {"model": SCRIPTED, "prompt": "once upon"})
    code, reply = call(server, "POST", "/v1/messages", {"model": SCRIPTED, "messages": MESSAGES, "max_tokens": 4})
    assert code == 200, reply
    assert [e for e, _ in sse_events(server, "/v1/messages", {"model": SCRIPTED, "messages": MESSAGES,
                                                              "max_tokens": 4, "stream": True})][-1] == "message_stop"
    # The same value sent by the client is the client's error, in Anthropic's shape.
    code, reply = call(server, "POST", "/v1/messages", {"model": SCRIPTED, "messages": MESSAGES, "max_tokens": 4,
                                                        "temperature": GLOBAL_TEMPERATURE})
    assert code == 400 and reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error"


def test_max_context_window_setting_limits_the_prompt(server):
    long = [{"role": "user", "content": "river " * (MAX_CONTEXT * 2)}]
    code, reply = call(server, "POST", "/v1/chat/completions", {"model": ALIAS, "messages": long})
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"
    code, reply = call(server, "POST", "/v1/messages", {"model": ALIAS, "messages": long, "max_tokens": 5})
    assert code == 400 and reply["error"]["type"] == "invalid_request_error"


def test_settings_edits_are_written_back_in_omlx_format(server):
    code, _ = call(server, "PUT", f"/v1/models/{SCRIPTED}/settings", {"alias": "scripty", "sampling": {"top_k": 5}})
    assert code == 200
    written = json.loads((server.home / "model_settings.json").read_text())
    assert written["version"] == 1
    assert written["models"][SCRIPTED] == {"model_alias": "scripty", "top_k": 5}
    assert written["models"]["tiny"] == OMLX_MODEL_SETTINGS["models"]["tiny"]  # oMLX-only keys kept
    assert call(server, "GET", "/v1/models/scripty/settings")[1]["id"] == SCRIPTED
    call(server, "PUT", f"/v1/models/{SCRIPTED}/settings", {"alias": None, "sampling": None})
    assert SCRIPTED not in json.loads((server.home / "model_settings.json").read_text())["models"]


# ---------------------------------------------------------------------------- mlx-vlm server's documented surface


def test_mlx_vlm_routes_without_v1(server, model_dir):
    code, listing = call(server, "GET", "/models")
    assert code == 200 and listing == call(server, "GET", "/v1/models")[1]
    reply = post(server, "/chat/completions", {"model": SCRIPTED, "messages": MESSAGES, "max_tokens": 3,
                                                "temperature": 0.0})
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    chunks = sse_events(server, "/chat/completions", {"model": SCRIPTED, "messages": MESSAGES, "max_tokens": 3,
                                                      "stream": True})
    assert chunks[-1][1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for _, d in chunks[:-1])
    reply = post(server, "/responses", {"model": "tiny", "input": "hello", "max_output_tokens": 3,
                                        "logit_bias": no_eos(model_dir, "tiny")})
    assert reply["object"] == "response" and reply["output"][-1]["type"] == "message"
    kinds = [e for e, _ in sse_events(server, "/responses", {"model": "tiny", "input": "hello", "stream": True,
                                                             "max_output_tokens": 3})]
    documented = ["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                  "response.content_part.done", "response.output_item.done", "response.completed"]
    deduped = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # one per run of deltas
    # The last is response.incomplete when max_output_tokens cut the answer short (OpenAI's rule).
    assert deduped[:-1] == documented[:-1] and deduped[-1] in ("response.completed", "response.incomplete")


def test_mlx_vlm_request_fields(server, model_dir):
    path = model_dir / "tiny-llama"
    off = tokenizer_of(path).apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False)
    on = tokenizer_of(path).apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=True)
    assert len(off) != len(on)
    base = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2}
    for flag, want in ((False, off), (True, on)):
        # enable_thinking wins over chat_template_kwargs, as in the mlx-vlm server.
        reply = post(server, "/chat/completions", {**base, "enable_thinking": flag,
                                                   "chat_template_kwargs": {"enable_thinking": not flag}})
        assert reply["usage"]["prompt_tokens"] == len(want)
        reply = post(server, "/v1/messages", {**base, "enable_thinking": flag})
        assert reply["usage"]["input_tokens"] + reply["usage"]["cache_read_input_tokens"] == len(want)
        reply = post(server, "/responses", {"model": "tiny-llama", "input": MESSAGES, "enable_thinking": flag})
        assert reply["usage"]["input_tokens"] == len(want)
    post(server, "/chat/completions", {**base, "enable_thinking": True, "thinking_budget": 4,
                                       "resize_shape": [224, 224]})
    post(server, "/chat/completions", {**base, "resize_shape": 448})
    code, reply = call(server, "POST", "/chat/completions", {**base, "resize_shape": [0, "x"]})
    assert code == 400 and reply["error"]["param"] == "resize_shape"
    code, reply = call(server, "POST", "/chat/completions", {**base, "thinking_budget": -1})
    assert code == 400 and reply["error"]["param"] == "thinking_budget"


def test_adapter_path_serves_the_base_model_with_that_adapter(server, model_dir):
    from mlx_lm import load

    from omlx.testing.reference import greedy_reference

    base_model = "tiny-llama"  # force_sampling at temperature 0: greedy, whatever is asked
    adapter = build_lora_adapter(model_dir / base_model, server.workdir / "my-lora")
    model, tokenizer = load(str(model_dir / base_model), adapter_path=str(adapter))
    prompt_ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    want = greedy_reference(model, prompt_ids, 8, set(tokenizer.eos_token_ids))
    del model
    # Token-exact against mlx-lm with the same adapter, through the raw prompt.
    body = {"model": base_model, "prompt": prompt_ids, "max_tokens": 8, "adapter_path": str(adapter)}
    reply = post(server, "/v1/completions", body)
    assert reply["choices"][0]["text"] == tokenizer.decode(want)
    base = post(server, "/v1/completions", {**body, "adapter_path": None})
    assert base["choices"][0]["text"] != reply["choices"][0]["text"]
    chat = post(server, "/chat/completions", {"model": base_model, "messages": MESSAGES, "max_tokens": 2,
                                              "adapter_path": str(adapter)})
    assert chat["model"] == reply["model"] != base_model
    # Its own pool entry, listed while resident, named in /health as the mlx-vlm server does.
    entries = {m["id"]: m for m in call(server, "GET", "/v1/models/status")[1]["models"]}
    entry = entries[reply["model"]]
    assert entry["loaded"] and entry["adapter_path"] == str(adapter.resolve()) and reply["model"] != SCRIPTED
    health = call(server, "GET", "/health")[1]
    assert health["loaded_model"] == base_model and health["loaded_adapter"] == str(adapter.resolve())
    # The other APIs take it too.
    messages = post(server, "/v1/messages", {"model": base_model, "messages": MESSAGES, "max_tokens": 2,
                                             "adapter_path": str(adapter)})
    assert messages["usage"]["output_tokens"] >= 1
    responses = post(server, "/responses", {"model": base_model, "input": "hi", "adapter_path": str(adapter)})
    assert responses["model"] == reply["model"]
    code, bad = call(server, "POST", "/chat/completions", {"model": base_model, "messages": MESSAGES,
                                                           "adapter_path": str(server.workdir)})
    assert code == 400 and bad["error"]["param"] == "adapter_path"
    code, bad = call(server, "POST", "/v1/messages", {"model": SCRIPTED, "messages": MESSAGES, "max_tokens": 2,
                                                      "adapter_path": "/nonexistent"})
    assert code == 400 and bad["type"] == "error"
    broken = server.workdir / "broken-lora"  # looks like an adapter, is not one
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    code, bad = call(server, "POST", "/chat/completions", {"model": base_model, "messages": MESSAGES,
                                                           "adapter_path": str(broken)})
    assert code == 400 and bad["error"]["param"] == "adapter_path" and "cannot be applied" in bad["error"]["message"]
    for weird in ("bad\u0000path", "x" * 5000, "~no-such-user-here/lora"):
        code, bad = call(server, "POST", "/chat/completions", {"model": base_model, "messages": MESSAGES,
                                                               "adapter_path": weird})
        assert code == 400 and bad["error"]["param"] == "adapter_path"
    assert call(server, "GET", "/health")[0] == 200  # and the server serves on


def test_unload_as_documented(server):
    code, body = call(server, "POST", "/unload")
    assert code == 200 and body["status"] == "success"
    assert not [m for m in call(server, "GET", "/v1/models/status")[1]["models"] if m["loaded"]]
    code, body = call(server, "POST", "/unload")
    assert code == 200 and body["status"] == "no_model_loaded"
    assert call(server, "GET", "/health")[1]["loaded_model"] is None


# ---------------------------------------------------------------------------- omlx launch


@pytest.fixture()
def fake_tools(tmp_path):
    """codex / claude / opencode stand-ins that record their arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("codex", "claude", "opencode"):
        script = bin_dir / tool
        script.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(tmp_path / tool)!r} + '.ran', 'w'))\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "CODEX_HOME": str(tmp_path / "codex"),
                "CLAUDE_CONFIG_DIR": str(tmp_path / "claude"), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
                "OMLX_HOME": str(tmp_path / "omlx-home")})
    return tmp_path, env


def _launch(server, env, *args) -> subprocess.CompletedProcess:
    port = server.root.rsplit(":", 1)[1]
    return subprocess.run([sys.executable, "-m", "omlx", "launch", *args[:1], "--port", port, *args[1:]],
                          env=env, capture_output=True, text=True, timeout=60)


def test_launch_codex_writes_a_provider_config_and_runs_codex(server, fake_tools):
    tmp, env = fake_tools
    config = tmp / "codex" / "config.toml"
    config.parent.mkdir()
    config.write_text('model = "gpt-5"\napproval_policy = "never"\n\n[mcp_servers.docs]\ncommand = "docs-mcp"\n')
    done = _launch(server, env, "codex", "--model", ALIAS, "exec", "--json", "say hi")
    assert done.returncode == 0, done.stderr
    written = tomllib.loads(config.read_text())
    # Codex's custom-provider format: model_provider names a [model_providers.<id>] table.
    assert written["model_provider"] == "omlx" and written["model"] == ALIAS
    provider = written["model_providers"]["omlx"]
    assert provider["base_url"] == server.base_url and provider["wire_api"] == "responses"
    assert isinstance(provider["name"], str)
    assert written["approval_policy"] == "never" and written["mcp_servers"]["docs"]["command"] == "docs-mcp"
    backups = list(config.parent.glob("config.toml.bak-*"))
    assert len(backups) == 1 and 'model = "gpt-5"' in backups[0].read_text()
    ran = json.loads((tmp / "codex.ran").read_text())
    assert ran["argv"] == ["exec", "--json", "say hi"]


def test_launch_claude_and_opencode(server, fake_tools):
    tmp, env = fake_tools
    done = _launch(server, env, "claude", "--model", "tiny-llama", "-p", "hello")
    assert done.returncode == 0, done.stderr
    settings = json.loads((tmp / "claude" / "settings.json").read_text())
    assert settings["env"]["ANTHROPIC_BASE_URL"] == server.root
    assert settings["env"]["ANTHROPIC_MODEL"] == "tiny-llama"
    ran = json.loads((tmp / "claude.ran").read_text())
    assert ran["argv"] == ["-p", "hello"] and ran["env"]["ANTHROPIC_BASE_URL"] == server.root
    assert ran["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"

    done = _launch(server, env, "opencode", "run", "hi")  # no --model: the server's first chat model
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp / "xdg" / "opencode" / "opencode.json").read_text())
    provider = config["provider"]["omlx"]
    assert config["$schema"] == "https://opencode.ai/config.json"
    assert provider["npm"] == "@ai-sdk/openai-compatible" and provider["options"]["baseURL"] == server.base_url
    provider_id, model = config["model"].split("/", 1)
    assert provider_id == "omlx" and model in provider["models"] and ALIAS in provider["models"]
    assert json.loads((tmp / "opencode.ran").read_text())["argv"] == ["run", "hi"]


def test_launch_without_a_server_says_so(fake_tools):
    tmp, env = fake_tools
    done = subprocess.run([sys.executable, "-m", "omlx", "launch", "codex", "--port", "9"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no omlx server answers" in done.stderr
    assert not (tmp / "codex" / "config.toml").exists()
