"""What a model says about itself: parameter count, quantization, capabilities from its
folder, and the bytes its weights hold once loaded.

Everything is read from the files (config.json, the safetensors headers, the chat template)
or the loaded arrays, never looked up in a table, so a model dropped into the model dir
describes itself.  Headers are read once per file version (path, size, mtime).  A leaf of
the model layer: the engine, the pool and every loader (embeddings, rerankers) use it
without importing one another.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .discovery import DiscoveredModel, safetensors_header

# Bits per element of each safetensors dtype.
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8,
               "I64": 64, "I32": 32, "U32": 32, "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8}


@dataclass(frozen=True)
class WeightStats:
    parameters: int  # logical weights (packed quantized values unpacked)
    dtype: str | None  # the dtype most of the bytes are stored in


_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx", "n_positions")
DEFAULT_CONTEXT_WINDOW = 4096


def context_window_of(config: dict) -> int:
    """The context length a model's config declares (its text config's, for a VLM)."""
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_WINDOW


def parameter_bytes(model) -> int:
    """Bytes a loaded model's arrays hold (what it counts against the memory budget)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def weight_stats(info: DiscoveredModel) -> WeightStats:
    if info.weights_format == "gguf":
        header = _gguf_header(info)
        if header is None:
            return WeightStats(0, None)
        return WeightStats(header.parameters, gguf_file_type(header))
    files = sorted(p for p in info.path.iterdir() if p.name.endswith(".safetensors")) if info.path.is_dir() else []
    bits = _quant_bits(info.config)
    total, by_dtype = 0, {}
    for path in files:
        st = path.stat()
        params, dtypes = _file_stats(str(path), st.st_size, st.st_mtime_ns, bits)
        total += params
        for dtype, n in dtypes:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return WeightStats(total, dtype)


@functools.lru_cache(maxsize=512)
def _file_stats(path: str, size: int, mtime_ns: int, quant_bits: int | None):
    header = safetensors_header(Path(path))
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    params, dtypes = 0, {}
    for name, tensor in tensors.items():
        shape = tensor.get("shape") or []
        count = 1
        for dim in shape:
            count *= int(dim)
        dtype = str(tensor.get("dtype"))
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.weight" in tensors and quant_bits:
            continue  # quantization bookkeeping, not model parameters
        if quant_bits and dtype == "U32" and f"{base}.scales" in tensors:
            count = count * 32 // quant_bits  # each uint32 packs 32/bits weights
        params += count
        dtypes[dtype] = dtypes.get(dtype, 0) + count * _DTYPE_BITS.get(dtype, 16)
    return params, tuple(dtypes.items())


def _quant_bits(config: dict) -> int | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        return quant["bits"]
    return None


def _gguf_header(info: DiscoveredModel):
    from omlx.gguf.header import GGUFError, read_header

    try:
        return read_header(info.path)
    except GGUFError:
        return None


def gguf_file_type(header) -> str:
    from omlx.gguf.inspect import file_type_name

    return file_type_name(header)


def weights_format(info: DiscoveredModel) -> str:
    """"gguf", "mlx" (MLX-written or quantized safetensors) or "safetensors"."""
    from .discovery import is_mlx_repo

    if info.weights_format:
        return info.weights_format
    return "mlx" if is_mlx_repo(info.model_id, info.path) else "safetensors"


def quantization(info: DiscoveredModel, stats: WeightStats) -> dict:
    """`{"name", "bits_per_weight"}`: MLX quantization from config.json, GGUF's file type
    (Q4_K_M, Q8_0, ...), else the dtype."""
    if info.weights_format == "gguf":
        bits_per_weight = round(info.size_bytes * 8 / stats.parameters, 2) if stats.parameters else None
        return {"name": stats.dtype or "unknown", "bits_per_weight": bits_per_weight}
    bits = _quant_bits(info.config)
    if stats.parameters:
        bits_per_weight = round(info.size_bytes * 8 / stats.parameters, 2)
    else:
        bits_per_weight = bits or _DTYPE_BITS.get(stats.dtype or "", None)
    if bits:
        return {"name": f"{bits}bit", "bits_per_weight": bits_per_weight}
    return {"name": (stats.dtype or "unknown").lower(), "bits_per_weight": bits_per_weight}


def params_string(parameters: int) -> str | None:
    """1_500_000_000 -> "1.5B", 270_000_000 -> "270M"."""
    if parameters <= 0:
        return None
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            value = parameters / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(parameters)


def chat_template(info: DiscoveredModel) -> str:
    """The model's chat template text ('' if none): tokenizer_config.json or a .jinja file,
    or a GGUF file's metadata."""
    if info.weights_format == "gguf":
        from omlx.gguf.header import GGUFError, read_header

        try:
            template = read_header(info.path).get("tokenizer.chat_template")
        except GGUFError:
            template = None
        return template if isinstance(template, str) else ""
    path = info.path / "tokenizer_config.json"
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, list):  # named templates: [{"name", "template"}]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    if not template:
        jinja = info.path / "chat_template.jinja"
        try:
            template = jinja.read_text(encoding="utf-8")
        except OSError:
            template = ""
    return template if isinstance(template, str) else ""


def capabilities(info: DiscoveredModel) -> dict:
    """vision from the model type; tool use and reasoning from what the chat template renders."""
    template = chat_template(info)
    return {
        "vision": info.model_type in ("vlm", "ocr"),
        "audio": info.takes_audio,
        "trained_for_tool_use": "tools" in template,
        "reasoning": "<think>" in template or "enable_thinking" in template or "reasoning_content" in template,
    }


def publisher(info: DiscoveredModel) -> str:
    """The org part of `org/name` ids; local flat folders are the user's own."""
    return info.model_id.split("/", 1)[0] if "/" in info.model_id else "local"


def display_name(info: DiscoveredModel) -> str:
    name = info.model_id.rsplit("/", 1)[-1]
    words = name.replace("_", "-").split("-")
    return " ".join(w if any(c.isdigit() for c in w) or w.isupper() else w.capitalize() for w in words)
