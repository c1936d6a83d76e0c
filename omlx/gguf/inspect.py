"""Whether a GGUF file can be served, decided from its header alone (fast enough for every
model listing): the mlx-lm config it maps to, or a GGUFError saying why not."""

from __future__ import annotations

from pathlib import Path

from .config import mlx_config
from .header import GGUFError, GGUFHeader, read_header
from .weights import BF16, F32, F16, NATIVE_TYPES

_TOKENIZER_KINDS = ("gpt2", "llama")


def convertible_types() -> frozenset[int]:
    """GGML types the converter can read: MLX's own, BF16, and those the gguf package can
    dequantize."""
    from gguf.quants import _type_traits

    return NATIVE_TYPES | {BF16, F32, F16} | {int(t) for t in _type_traits}


def check_types(header: GGUFHeader) -> None:
    known = convertible_types()
    for tensor in header.tensors:
        if tensor.type_id not in known:
            raise GGUFError(f"tensor {tensor.name!r} is stored as {tensor.type_name}, which omlx "
                            "cannot read yet")


def servable_config(path: str | Path) -> tuple[dict, GGUFHeader]:
    """(mlx-lm config, header) of a GGUF model omlx can convert and serve."""
    header = read_header(path)
    config = mlx_config(header)
    check_types(header)
    kind = header.get("tokenizer.ggml.model")
    if kind not in _TOKENIZER_KINDS:
        raise GGUFError(f"tokenizer kind {kind!r} is not supported for GGUF yet "
                        f"({' and '.join(_TOKENIZER_KINDS)} are)")
    return config, header


def file_type_name(header: GGUFHeader) -> str:
    """llama.cpp's name for the file's quantization mix ('Q4_K_M', 'Q4_1', 'F16'), else the
    type holding most of the weights."""
    from gguf import LlamaFileType

    value = header.get("general.file_type")
    if isinstance(value, int):
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts = header.type_counts()
    return max(counts, key=counts.get) if counts else "unknown"
