"""A GGUF file's metadata as an mlx-lm config.json, and its tensor names as mlx-lm's.

Only architectures whose metadata and tensors map one to one onto an mlx-lm model are
accepted; anything else is refused with a reason (shown in the model list), never guessed.
"""

from __future__ import annotations

import re

from .header import GGUFError, GGUFHeader

# GGUF architecture -> (mlx-lm model_type, HF architectures name, Q/K rows permuted).
# llama.cpp's converter reorders the rows of Q and K for the llama family (its RoPE pairs
# adjacent dimensions, HF's pairs halves); qwen2 / qwen3 use NeoX RoPE and are stored as is.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("llama", "MistralForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.([a-z_]+)$")
# Tensors llama.cpp stores that mlx-lm computes itself.
_IGNORED = {"rope_freqs", "rope_factors_long", "rope_factors_short"}


def mlx_module_name(gguf_module: str) -> str | None:
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'; None for tensors with no mlx-lm
    counterpart."""
    if gguf_module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_module]
    match = _LAYER.match(gguf_module)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def split_tensor_name(name: str) -> tuple[str, str]:
    """'blk.0.attn_q.weight' -> ('blk.0.attn_q', 'weight'); also .bias, .scales, .biases."""
    module, _, suffix = name.rpartition(".")
    return module, suffix


def permuted_qk(header: GGUFHeader) -> bool:
    return ARCHITECTURES[header.architecture][2]


def _int(header: GGUFHeader, key: str, default=None):
    value = header.arch_value(key, default)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GGUFError(f"metadata {header.architecture}.{key} is {value!r}, not a number") from None


def _float(header: GGUFHeader, key: str, default: float) -> float:
    value = header.arch_value(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GGUFError(f"metadata {header.architecture}.{key} is {value!r}, not a number") from None


def check_supported(header: GGUFHeader) -> None:
    """Raise GGUFError naming what cannot be served, before any weights are read."""
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"architecture {arch!r} is not supported for GGUF yet "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if header.get("split.count", 1) not in (0, 1):
        raise GGUFError("split GGUF files (-0000N-of-0000M) are not supported; merge them with "
                        "llama-gguf-split --merge")
    if header.get(f"{arch}.expert_count"):
        raise GGUFError("mixture-of-experts GGUF models are not supported yet")
    scaling = header.arch_value("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise GGUFError(f"RoPE scaling {scaling!r} is not supported for GGUF yet")
    for tensor in header.tensors:
        module, suffix = split_tensor_name(tensor.name)
        if module in _IGNORED:
            if module == "rope_freqs":
                raise GGUFError("per-dimension RoPE frequencies (rope_freqs, Llama 3.1 style) "
                                "are not supported for GGUF yet")
            continue
        if mlx_module_name(module) is None or suffix not in ("weight", "bias"):
            raise GGUFError(f"tensor {tensor.name!r} has no counterpart in mlx-lm's {arch} model")
    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if header.arch_value(key) is None:
            raise GGUFError(f"metadata {arch}.{key} is missing")


def mlx_config(header: GGUFHeader) -> dict:
    """The config.json mlx-lm builds the model from (without `quantization`, which depends
    on how the weights are stored and is added by the converter)."""
    check_supported(header)
    arch = header.architecture
    model_type, architecture, _ = ARCHITECTURES[arch]
    hidden = _int(header, "embedding_length")
    heads = _int(header, "attention.head_count")
    names = {t.name for t in header.tensors}
    embed = next(t for t in header.tensors if t.name == "token_embd.weight") \
        if "token_embd.weight" in names else None
    if embed is None:
        raise GGUFError("the file has no token_embd.weight tensor")
    tokens = header.get("tokenizer.ggml.tokens")
    vocab = _int(header, "vocab_size") or embed.shape[0]
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "num_hidden_layers": _int(header, "block_count"),
        "intermediate_size": _int(header, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(header, "attention.head_count_kv", heads),
        "head_dim": _int(header, "attention.key_length", hidden // heads),
        "rms_norm_eps": _float(header, "attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _float(header, "rope.freq_base", 10000.0),
        "max_position_embeddings": _int(header, "context_length", 4096),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float16",
    }
    if header.arch_value("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _float(header, "rope.scaling.factor", 1.0)}
    if model_type == "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    elif model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for key, meta in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = header.get(meta)
        if isinstance(value, int) and (tokens is None or value < _vocab_len(tokens, vocab)):
            config[key] = value
    return config


def _vocab_len(tokens, default: int) -> int:
    count = getattr(tokens, "count", None)
    return count if isinstance(count, int) else len(tokens) if isinstance(tokens, list) else default
