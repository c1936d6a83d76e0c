"""A GGUF file's metadata as an mlx-lm config.json, and its tensor names as mlx-lm's.

Only architectures whose metadata and tensors map one to one onto an mlx-lm model are
accepted; anything else is refused with a reason (shown in the model list), never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .header import GGUFError, GGUFHeader


@dataclass(frozen=True)
class Architecture:
    model_type: str  # mlx-lm's
    hf_name: str  # config.json "architectures"
    # llama.cpp's converter reorders the rows of Q and K for the llama family (its RoPE pairs
    # adjacent dimensions, HF's pairs halves); NeoX-RoPE families are stored as they are.
    permuted_qk: bool = False
    # What llama.cpp added to every norm weight: Gemma's RMSNorm computes x * (1 + w), so its
    # converter stores 1 + w and runs a plain x * w; mlx-lm's Gemma adds the 1 itself.
    norm_offset: float = 0.0
    # GGUF layer tensor -> mlx-lm module, where this family differs from llama's.
    layer_names: dict = field(default_factory=dict)
    # The residual stream outgrows float16 (Gemma 3 270M's reaches ~1e5; float16 ends at 65504).
    # mlx-lm carries it in the embedding output's dtype, so the embedding must not give float16.
    wide_residual: bool = False


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "mistral": Architecture("llama", "MistralForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM"),
    # Gemma 3 norms around both halves of each block: llama.cpp's ffn_norm is the
    # pre-feed-forward norm there, not llama's post-attention one.
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", norm_offset=1.0, wide_residual=True, layer_names={
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }),
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


def mlx_module_name(gguf_module: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'; None for tensors with no mlx-lm
    counterpart in that architecture's model."""
    if gguf_module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_module]
    match = _LAYER.match(gguf_module)
    if match:
        names = ARCHITECTURES[arch].layer_names if arch in ARCHITECTURES else {}
        name = names.get(match.group(2)) or _LAYER_NAMES.get(match.group(2))
        if name:
            return f"model.layers.{match.group(1)}.{name}"
    return None


def is_norm(gguf_module: str) -> bool:
    """Norm weights: 'output_norm', 'blk.N.attn_norm', 'blk.N.attn_q_norm', 'blk.N.post_ffw_norm'."""
    return gguf_module.endswith("_norm")


def split_tensor_name(name: str) -> tuple[str, str]:
    """'blk.0.attn_q.weight' -> ('blk.0.attn_q', 'weight'); also .bias, .scales, .biases."""
    module, _, suffix = name.rpartition(".")
    return module, suffix


def permuted_qk(header: GGUFHeader) -> bool:
    return ARCHITECTURES[header.architecture].permuted_qk


def norm_offset(header: GGUFHeader) -> float:
    return ARCHITECTURES[header.architecture].norm_offset


def wide_residual(header: GGUFHeader) -> bool:
    return ARCHITECTURES[header.architecture].wide_residual


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
        if mlx_module_name(module, arch) is None or suffix not in ("weight", "bias"):
            raise GGUFError(f"tensor {tensor.name!r} has no counterpart in mlx-lm's {arch} model")
    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if header.arch_value(key) is None:
            raise GGUFError(f"metadata {arch}.{key} is missing")
    if arch == "gemma3":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if header.arch_value(key):
                raise GGUFError(f"{arch}.{key} is set, and mlx-lm's gemma3_text has no softcapping")
        if header.arch_value("attention.sliding_window") is None:
            raise GGUFError(f"metadata {arch}.attention.sliding_window is missing")


def mlx_config(header: GGUFHeader) -> dict:
    """The config.json mlx-lm builds the model from (without `quantization`, which depends
    on how the weights are stored and is added by the converter)."""
    check_supported(header)
    arch = header.architecture
    model_type, architecture = ARCHITECTURES[arch].model_type, ARCHITECTURES[arch].hf_name
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
    elif model_type == "gemma3_text":
        config.update(_gemma3_fields(header, config))
    for key, meta in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = header.get(meta)
        if isinstance(value, int) and (tokens is None or value < _vocab_len(tokens, vocab)):
            config[key] = value
    return config


def _gemma3_fields(header: GGUFHeader, config: dict) -> dict:
    """What a Gemma 3 GGUF leaves to llama.cpp's code rather than its metadata, decided as
    llama.cpp decides it (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer global, the rest
    sliding with RoPE base 10000 and no scaling; queries scaled by 1/sqrt(head_dim), except the
    27B (62 layers), which uses 1/sqrt(hidden / heads)."""
    layers = config["num_hidden_layers"]
    if layers == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    return {
        "sliding_window": _int(header, "attention.sliding_window"),
        "sliding_window_pattern": _sliding_window_pattern(header, layers),
        "rope_local_base_freq": _float(header, "rope.freq_base_swa", 10000.0),
        "query_pre_attn_scalar": scalar,
    }


def _sliding_window_pattern(header: GGUFHeader, layers: int) -> int:
    """mlx-lm's gemma3_text knows one layout: layer i is global when (i + 1) % pattern == 0.
    Newer files may spell the layout out (an int period, or one bool per layer, true for
    sliding); anything that is not such a period is refused rather than approximated."""
    value = header.arch_value("attention.sliding_window_pattern")
    period = None
    if value is None:
        period = 6
    elif isinstance(value, int) and not isinstance(value, bool):
        period = value
    elif hasattr(value, "__len__") and len(value) == layers:
        sliding = [bool(v) for v in value]
        period = next((i + 1 for i, s in enumerate(sliding) if not s), None)
        if period is not None and any(s != ((i + 1) % period != 0) for i, s in enumerate(sliding)):
            period = None
    # mlx-lm builds the global layers' mask from layer pattern - 1, so one must exist.
    if period is not None and 1 <= period <= layers:
        return period
    raise GGUFError(f"{header.architecture}.attention.sliding_window_pattern {value!r} is not a "
                    "layout mlx-lm's gemma3_text can build (every Nth layer global)")


def _vocab_len(tokens, default: int) -> int:
    count = getattr(tokens, "count", None)
    return count if isinstance(count, int) else len(tokens) if isinstance(tokens, list) else default
