"""Write small GGUF model files the way llama.cpp's converter does, for tests and benches.

Each file comes with a reference: an mlx-lm float32 folder (config, safetensors, the
original tokenizer) holding exactly the weights omlx should compute with once it has
converted the file and widened it to float32.  For types kept as they are (F32, F16, BF16,
Q4_0, Q4_1, Q8_0) those are the GGUF values dequantized by the `gguf` package, an
implementation independent of omlx's; for types omlx re-quantizes (K-quants, Q5_*) they are
that dequantization passed through MLX quantization as omlx.gguf.weights specifies it (Q4_K:
its own groups, with float16 scales and offsets).

K-quant tensors are written as random blocks (the `gguf` package can read but not write
them), scaled to the spread of the model's own weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .tiny_models import CHAT_TEMPLATE, CONTROL_TOKENS, MARKUP_TOKENS, TinyModelSpec, _training_corpus, build_model

# Big enough for K-quants (rows of 256), small enough to convert and run in well under a second.
GGUF_SPEC = TinyModelSpec(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512, seed=5)
SPM_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_RANDOM_BLOCK_TYPES = ("Q4_K", "Q6_K")
# Byte offsets of the float16 scale fields in each random-block type (d, and dmin for Q4_K).
_SCALE_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}

_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class GGUFFixture:
    gguf: Path
    reference: Path  # mlx-lm float32 folder: the weights the converted model computes with


def gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{_HF_TO_GGUF[rest]}.{suffix}"
    return f"{_HF_TO_GGUF[module]}.{suffix}"


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Q / K rows for its RoPE (convert_hf_to_gguf's permute)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def build_spm_tokenizer(vocab_size: int):
    """A SentencePiece-style BPE (Llama 2 / Mistral): ▁ for spaces, <0xNN> byte fallback,
    pieces never spanning two words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPM_SPECIAL + _BYTE_TOKENS,
                                  show_progress=False)
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return tokenizer


def write_gguf_model(out_dir: str | Path, name: str, qtype: str = "F32", vocab: str = "bpe",
                     spec: TinyModelSpec = GGUF_SPEC) -> GGUFFixture:
    """`out_dir/name.gguf` plus its reference folder `out_dir/name-reference/`."""
    out_dir = Path(out_dir)
    reference = out_dir / f"{name}-reference"
    if vocab == "bpe":
        build_model(reference, spec)
    elif vocab == "spm":
        _build_spm_model(reference, spec)
    else:
        raise ValueError(f"vocab must be 'bpe' or 'spm', not {vocab!r}")
    config = json.loads((reference / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(reference / "model.safetensors")).items()}
    tokenizer = json.loads((reference / "tokenizer.json").read_text())
    gguf_path = out_dir / f"{name}.gguf"
    ref_weights = _write_file(gguf_path, config, weights, tokenizer, vocab, qtype)
    mx.save_safetensors(str(reference / "model.safetensors"),
                        {k: mx.array(v) for k, v in ref_weights.items()}, metadata={"format": "mlx"})
    return GGUFFixture(gguf_path, reference)


def _build_spm_model(path: Path, spec: TinyModelSpec) -> None:
    from .tiny_models import _random_model

    tokenizer = build_spm_tokenizer(spec.vocab_size)
    model, config = _random_model(replace(spec, model_type="llama"), tokenizer)
    model.lm_head.weight = model.lm_head.weight * spec.logit_scale
    path.mkdir(parents=True, exist_ok=True)
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())})
    config["bos_token_id"] = tokenizer.token_to_id("<s>")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": spec.max_position_embeddings,
    }, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [config["eos_token_id"]]}))


def _write_file(path: Path, config: dict, weights: dict, tokenizer: dict, vocab: str, qtype: str) -> dict:
    """Write the GGUF file; return the reference weights (HF names, float32)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _write_vocab(writer, tokenizer, config, vocab)
    writer.add_chat_template(CHAT_TEMPLATE)

    reference = {}
    rng = np.random.default_rng(config.get("seed", 0))
    for hf_name in sorted(weights):
        value = weights[hf_name].astype(np.float32)
        name = gguf_name(hf_name)
        permute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        heads = next((n for key, n in permute.items() if f".{key}." in name), None)
        stored = permute_rows(value, heads) if heads else value
        tensor_type = _tensor_type(name, value, qtype)
        raw, values = _encode(stored, tensor_type, rng)
        writer.add_tensor(name, raw, raw_dtype=None if tensor_type in ("F32", "F16") else gguf.GGMLQuantizationType[tensor_type])
        reference[hf_name] = unpermute_rows(values, heads) if heads else values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _tensor_type(name: str, value: np.ndarray, qtype: str) -> str:
    if value.ndim < 2:
        return "F32"  # norms stay float, as llama.cpp keeps them
    if qtype in _RANDOM_BLOCK_TYPES and name.startswith(("token_embd", "output")):
        return "Q8_0"  # as in a Q4_K_M file: a mix, with the embeddings in another type
    return qtype


def _encode(value: np.ndarray, tensor_type: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what goes in the file, the float32 values omlx should end up computing with)."""
    import gguf
    from gguf.quants import dequantize, quantize

    if tensor_type == "F32":
        return value, value
    if tensor_type == "F16":
        half = value.astype(np.float16)
        return half, half.astype(np.float32)
    qt = gguf.GGMLQuantizationType[tensor_type]
    raw = _random_blocks(value, qt, rng) if tensor_type in _RANDOM_BLOCK_TYPES else quantize(value, qt)
    values = dequantize(raw, qt).astype(np.float32).reshape(value.shape)
    if tensor_type in ("BF16", "Q4_0", "Q4_1", "Q8_0"):
        return raw, values
    if tensor_type == "Q4_K":
        return raw, _q4_k_with_half_scales(raw, value.shape)
    return raw, _mlx_requantized(values, tensor_type)


def _q4_k_with_half_scales(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_K as omlx holds it (each group of 32 affine: scale d * sc, offset -dmin * m, both
    rounded to float16), computed from the blocks with the `gguf` package's own unpacking."""
    from gguf.quants import Q4_K

    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scales = (d * sc).astype(np.float16).astype(np.float32)[..., None]
    offsets = (-(dmin * m)).astype(np.float16).astype(np.float32)[..., None]
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, 8, 32).astype(np.float32)
    return (scales * q + offsets).reshape(shape)


def _mlx_requantized(values: np.ndarray, tensor_type: str) -> np.ndarray:
    """What omlx makes of a type MLX cannot hold: MLX affine quantization, group 32, float16
    scales and biases, dequantized in float32."""
    import gguf

    from omlx.gguf.weights import GROUP_SIZE, requant_bits

    bits = requant_bits(int(gguf.GGMLQuantizationType[tensor_type]))
    w, scales, biases = mx.quantize(mx.array(values), group_size=GROUP_SIZE, bits=bits)
    back = mx.dequantize(w, scales.astype(mx.float16).astype(mx.float32),
                         biases.astype(mx.float16).astype(mx.float32), group_size=GROUP_SIZE, bits=bits)
    return np.array(back)


def _random_blocks(value: np.ndarray, qtype, rng) -> np.ndarray:
    """Random K-quant blocks whose values spread like `value`'s."""
    import gguf
    from gguf.quants import dequantize

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = value.shape
    raw = rng.integers(0, 256, size=(rows, cols // block * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    fields = _SCALE_FIELDS[qtype.name]
    for offset in fields:
        blocks[:, offset:offset + 2] = np.full(len(blocks), 1.0, np.float16).view(np.uint8).reshape(-1, 2)
    spread = float(dequantize(raw, qtype).std()) or 1.0
    scale = np.float16(value.std() / spread)
    for offset in fields:
        blocks[:, offset:offset + 2] = np.full(len(blocks), scale, np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def _write_vocab(writer, tokenizer: dict, config: dict, vocab: str) -> None:
    model = tokenizer["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    eos = config["eos_token_id"]
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    if vocab == "bpe":
        control, markup = set(CONTROL_TOKENS), set(MARKUP_TOKENS)
        types = [3 if t in control else 4 if t in markup else 5 if t.startswith("[PAD") else 1 for t in tokens]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
        writer.add_pad_token_id(model["vocab"].get("<|endoftext|>", 0))
        return
    # SentencePiece: pieces scored so that earlier merges rank higher, as sentencepiece does.
    special = set(SPM_SPECIAL)
    types = [2 if t == "<unk>" else 3 if t in special else 6 if t in _BYTE_TOKENS
             else 5 if t.startswith("[PAD") else 1 for t in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_add_space_prefix(True)


def corrupt_copies(source: Path, out_dir: Path) -> dict[str, Path]:
    """Broken variants of a good GGUF file, by what is wrong with them."""
    data = source.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "truncated": data[: len(data) * 2 // 3],
        "header-only": data[:200],
        "not-gguf": b"PK\x03\x04" + data[4:2000],
        "garbage-lengths": data[:24] + b"\xff" * 64 + data[88:4000],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = out_dir / f"{name}.gguf"
        paths[name].write_bytes(content)
    return paths


def copy_as_lmstudio(source: Path, model_dir: Path, publisher: str, model: str) -> Path:
    """`model_dir/publisher/model/file.gguf`, LM Studio's layout."""
    target = model_dir / publisher / model / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
