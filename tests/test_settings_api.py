"""Settings on a real server: settings.json + model_settings.json + env + flags together,
defaults applied to requests (checked token-exactly against mlx-lm), and edits through
`PUT /v1/models/{id}/settings` that persist and apply without a restart."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from conftest import chat_prompt_ids, decode, reference_greedy
from omlx_process import call, omlx_server

from omlx.testing.tiny_models import TinyModelSpec, build_model

MESSAGES = [{"role": "user", "content": "tell me about the river"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings-models")
    for seed, name in enumerate(("a", "b", "c")):
        build_model(root / name, TinyModelSpec(seed=seed))
    return root


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("settings-api")
    home = workdir / "home"
    home.mkdir()
    (home / "settings.json").write_text(json.dumps({
        "max_tokens": 5, "sampling": {"temperature": 0.0}, "max_num_seqs": 4, "max_num_batched_tokens": 100,
    }))
    (home / "model_settings.json").write_text(json.dumps({
        "a": {"max_tokens": 7, "chat_template_kwargs": {"enable_thinking": False}},
    }))
    env = {"PREFILL_STEP_SIZE": "48", "MAX_KV_SIZE": "1024", "KV_BITS": "4", "PRELOAD_MODEL": "c"}
    with omlx_server(model_dir, workdir, "--kv-cache-gb", "0.01", "--max-num-seqs", "8", env=env) as running:
        running.home = home
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def no_eos(model_dir: Path, name: str) -> dict:
    eos = json.loads((model_dir / name / "config.json").read_text())["eos_token_id"]
    return {str(eos): -100}


def test_env_flags_and_files_shape_the_engine(server):
    # PRELOAD_MODEL loaded c at startup; MAX_KV_SIZE capped its context; PREFILL_STEP_SIZE
    # (env) beat settings.json's max_num_batched_tokens; --max-num-seqs beat the file.
    code, body = call(server, "GET", "/api/v1/models")
    assert code == 200
    c = {m["key"]: m for m in body["models"]}["c"]
    assert len(c["loaded_instances"]) == 1
    config = c["loaded_instances"][0]["config"]
    assert config["context_length"] == 1024
    assert config["eval_batch_size"] == 48
    assert config["max_concurrent_predictions"] == 8
    # KV_BITS reached the engine; the tiny models' 16-wide heads cannot be quantized, which
    # the log says instead of failing the load.
    assert "KV quantization needs a head dim divisible by 32" in server.log_path.read_text()


def test_model_and_global_defaults_apply_under_the_request(server, client, model_dir):
    # Model a: max_tokens 7 and enable_thinking false from its settings, greedy from global.
    result = client.chat.completions.create(model="a", messages=MESSAGES, logit_bias=no_eos(model_dir, "a"))
    thinking_off = chat_prompt_ids(model_dir / "a", MESSAGES)
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens > len(thinking_off)  # the template added the empty think block

    # The request's own values win over every default.
    result = client.chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=3, logit_bias=no_eos(model_dir, "a"),
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens == len(thinking_off)

    # Model b has no settings of its own: the global max_tokens 5 and temperature 0 apply,
    # so its output is mlx-lm's greedy continuation.
    result = client.chat.completions.create(model="b", messages=MESSAGES, logit_bias=no_eos(model_dir, "b"))
    assert result.usage.completion_tokens == 5
    prompt = chat_prompt_ids(model_dir / "b", MESSAGES)
    tokens, _ = reference_greedy(model_dir / "b", prompt, 5)
    completion = client.completions.create(model="b", prompt=prompt, logit_bias=no_eos(model_dir, "b"))
    assert completion.choices[0].text == decode(model_dir / "b", tokens)


def test_put_settings_persists_atomically_and_applies_at_once(server, client, model_dir):
    code, body = call(server, "PUT", "/v1/models/b/settings", {"alias": "bravo", "max_tokens": 2})
    assert code == 200
    assert body["settings"] == {"alias": "bravo", "max_tokens": 2}
    assert json.loads((server.home / "model_settings.json").read_text())["b"] == {"alias": "bravo", "max_tokens": 2}
    assert not [p for p in server.home.iterdir() if p.name.endswith(".tmp")]

    result = client.chat.completions.create(model="bravo", messages=MESSAGES, logit_bias=no_eos(model_dir, "b"))
    assert result.model == "b"
    assert result.usage.completion_tokens == 2
    assert call(server, "GET", "/v1/models/bravo/settings")[1] == {"id": "b", "settings": {"alias": "bravo", "max_tokens": 2}}
    statuses = {m["id"]: m for m in call(server, "GET", "/v1/models/status")[1]["models"]}
    assert statuses["b"]["alias"] == "bravo"

    # null removes a setting; the global default is back.
    call(server, "PUT", "/v1/models/b/settings", {"max_tokens": None})
    result = client.chat.completions.create(model="b", messages=MESSAGES, logit_bias=no_eos(model_dir, "b"))
    assert result.usage.completion_tokens == 5


def test_pinning_through_the_api_loads_the_model_now(server):
    call(server, "POST", "/v1/models/a/unload")
    code, body = call(server, "PUT", "/v1/models/a/settings", {"pinned": True})
    assert code == 200
    assert body["status"]["loaded"] is True and body["status"]["pinned"] is True
    call(server, "PUT", "/v1/models/a/settings", {"pinned": None})


@pytest.mark.parametrize(("body", "param"), [
    ({"ttl": "soon"}, "ttl"),
    ({"unknown_key": 1}, "unknown_key"),
    ({"sampling": {"temperature": "hot"}}, "sampling.temperature"),
    ([1, 2], None),
])
def test_invalid_settings_are_a_400_and_change_nothing(server, body, param):
    before = (server.home / "model_settings.json").read_text()
    code, reply = call(server, "PUT", "/v1/models/c/settings", body)
    assert code == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert (server.home / "model_settings.json").read_text() == before


def test_settings_of_an_unknown_model_are_a_404(server):
    code, body = call(server, "PUT", "/v1/models/nope/settings", {"ttl": 5})
    assert code == 404 and body["error"]["code"] == "model_not_found"
    code, _ = call(server, "PUT", "/v1/models/c/settings", b"{not json")
    assert code == 400


def build_lora_adapter(model_path: Path, adapter_path: Path) -> Path:
    """A LoRA adapter in mlx-lm's format with random (non-zero) weights, so it visibly
    changes what the model generates."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_path))
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(3)
    weights = {name: mx.random.normal(value.shape) * 0.5
               for name, value in tree_flatten(model.parameters()) if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    adapter_path.mkdir(parents=True)
    mx.save_safetensors(str(adapter_path / "adapters.safetensors"), weights)
    (adapter_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}))
    return adapter_path


def greedy(model_path: Path, prompt: list[int], n: int, adapter_path: Path | None = None) -> list[int]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_path), adapter_path=str(adapter_path) if adapter_path else None)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def test_adapter_path_setting_applies_on_the_next_load(server, client, model_dir, tmp_path):
    adapter = build_lora_adapter(model_dir / "c", tmp_path / "adapter")
    prompt = chat_prompt_ids(model_dir / "c", MESSAGES)
    bias = no_eos(model_dir, "c")
    base = client.completions.create(model="c", prompt=prompt, max_tokens=6, logit_bias=bias)

    assert call(server, "PUT", "/v1/models/c/settings", {"adapter_path": str(adapter)})[0] == 200
    assert call(server, "POST", "/v1/models/c/unload")[1]["unloaded"] is True
    adapted = client.completions.create(model="c", prompt=prompt, max_tokens=6, logit_bias=bias)
    call(server, "PUT", "/v1/models/c/settings", {"adapter_path": None})
    call(server, "POST", "/v1/models/c/unload")

    expected = greedy(model_dir / "c", prompt, 6, adapter)
    assert expected != greedy(model_dir / "c", prompt, 6)  # the adapter matters
    assert adapted.choices[0].text == decode(model_dir / "c", expected)
    assert adapted.choices[0].text != base.choices[0].text
