"""A GGUF file's tensors as mlx-lm weights: names mapped, Q/K rows put back in HF order,
quantized tensors kept quantized in MLX's layout.

Two readers:
- `mx.load` when every tensor is F32, F16, Q4_0, Q4_1 or Q8_0: MLX reads those natively (the
  quantized ones straight into its affine layout, group size 32) at C++ speed.
- otherwise every tensor is read from the mapped file here.  Q4_0 / Q4_1 / Q8_0 / Q4_K are
  repacked into the same MLX layout (GGML's formats are affine with a group of 32: losslessly,
  but for Q4_K's per-group scale and offset, products rounded to float16), BF16
  stays BF16 (`mx.load` would narrow it to F16), and any other type (K-quants, IQ, Q5_*) is
  dequantized with the `gguf` package and re-quantized with `mx.quantize`, group size 32:
  to 8 bits when the source stores 5 or more bits per weight, to 4 bits otherwise.  That is
  a second rounding on top of llama.cpp's.  Gemma 3 270M Q4_K_M (Q4_K repacked, Q5_0 / Q6_K
  re-quantized to 8 bits), run in float32, agrees with the file's exact dequantization on 99%
  of next-token argmaxes; re-quantizing its Q4_K tensors too gave 88%
  (bench/gemma3_gguf_agreement.py).
- Gemma's norm weights were stored by llama.cpp as 1 + w (see config.Architecture.norm_offset);
  the offset is taken off here, and its embedding is kept from producing float16
  (config.Architecture.wide_residual).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .config import is_norm, mlx_module_name, norm_offset, permuted_qk, split_tensor_name, wide_residual
from .header import GGUFHeader, TensorInfo

log = logging.getLogger("omlx.gguf")

GROUP_SIZE = 32
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 2, 3, 8, 12, 30
NATIVE_TYPES = frozenset({F32, F16, Q4_0, Q4_1, Q8_0})
# Types that are affine with a group of 32, so MLX holds them as they are.
_KEPT_BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8, Q4_K: 4}


def requant_bits(type_id: int) -> int:
    """MLX bits for a GGML type MLX cannot hold as it is: 8 when the source keeps 5 or more
    bits per weight (Q5_*, Q6_K, Q8_K), else 4."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return 8 if nbytes * 8 / block >= 5 else 4


def stored_bits(tensor: TensorInfo) -> int | None:
    """The MLX bits a tensor ends up with (None: kept as floats)."""
    if tensor.type_id in (F32, F16, BF16) or len(tensor.shape) < 2:
        return None
    return _KEPT_BITS.get(tensor.type_id) or requant_bits(tensor.type_id)


def load_weights(header: GGUFHeader, progress: Callable[[int, int], None] | None = None
                 ) -> tuple[dict[str, mx.array], dict]:
    """(mlx-lm weights, the `quantization` entry of config.json or {})."""
    native = all(t.type_id in NATIVE_TYPES for t in header.tensors)
    raw = _load_native(header) if native else _load_each(header, progress)
    weights: dict[str, mx.array] = {}
    quantization: dict = {}
    heads, kv_heads = _heads(header)
    permute = permuted_qk(header)
    offset = norm_offset(header)
    for tensor in header.tensors:
        module, suffix = split_tensor_name(tensor.name)
        target = mlx_module_name(module, header.architecture)
        if target is None:  # rope_freqs and the like: mlx-lm derives them itself
            continue
        parts = {key: value for key, value in raw.pop(tensor.name).items()}
        if permute and module.endswith(("attn_q", "attn_k")):
            n = heads if module.endswith("attn_q") else kv_heads
            parts = {key: _unpermute_rows(value, n) for key, value in parts.items()}
        if offset and is_norm(module) and suffix == "weight":
            parts["weight"] = _shift(parts["weight"], -offset)
        for key, value in parts.items():
            # `.bias` is a layer's bias; `.scales` / `.biases` belong to a quantized weight.
            weights[f"{target}.{suffix if key == 'weight' else key}"] = value
        bits = stored_bits(tensor) if "scales" in parts else None
        if bits is not None:
            quantization[target] = {"group_size": GROUP_SIZE, "bits": bits}
    if wide_residual(header):
        _widen_embedding(weights)
    return weights, _quantization_config(quantization)


def _widen_embedding(weights: dict[str, mx.array]) -> None:
    """An embedding whose output is not float16: quantized ones get float32 scales and biases
    (exact: GGML's are float16; the residual stream then runs in float32, as the rest of the
    model already does behind its float32 norms), float16 ones become bfloat16 (float16's
    precision is not worth doubling the largest tensor for; bfloat16 is what Gemma was trained
    in)."""
    prefix = "model.embed_tokens"
    if f"{prefix}.scales" in weights:
        for key in ("scales", "biases"):
            weights[f"{prefix}.{key}"] = weights[f"{prefix}.{key}"].astype(mx.float32)
    elif weights[f"{prefix}.weight"].dtype == mx.float16:
        weights[f"{prefix}.weight"] = weights[f"{prefix}.weight"].astype(mx.bfloat16)


def _heads(header: GGUFHeader) -> tuple[int, int]:
    heads = int(header.arch_value("attention.head_count"))
    return heads, int(header.arch_value("attention.head_count_kv", heads))


def _shift(value: mx.array, delta: float) -> mx.array:
    """value + delta computed in float32 (llama.cpp added its offset in float32), stored in
    the tensor's own dtype."""
    return (value.astype(mx.float32) + delta).astype(value.dtype)


def _unpermute_rows(value: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's reordering of Q/K rows: within each head it interleaves the two
    halves (row 2i, 2i+1 <- i, i + d/2); this puts them back as HF and mlx-lm expect."""
    rows = value.shape[0]
    rest = value.shape[1:]
    return (value.reshape(n_head, rows // n_head // 2, 2, *rest)
            .swapaxes(1, 2).reshape(rows, *rest))


def _quantization_config(per_module: dict) -> dict:
    """mlx-lm's `quantization`: the most common bits as the default, other modules by path."""
    if not per_module:
        return {}
    counts: dict[int, int] = {}
    for entry in per_module.values():
        counts[entry["bits"]] = counts.get(entry["bits"], 0) + 1
    bits = max(counts, key=counts.get)
    config: dict = {"group_size": GROUP_SIZE, "bits": bits}
    config.update({path: entry for path, entry in per_module.items() if entry["bits"] != bits})
    return config


# ---------------------------------------------------------------------------- readers


def _load_native(header: GGUFHeader) -> dict[str, dict[str, mx.array]]:
    arrays = mx.load(str(header.path))
    grouped: dict[str, dict[str, mx.array]] = {}
    for name, value in arrays.items():
        for tensor_suffix in (".scales", ".biases"):
            if name.endswith(tensor_suffix):
                grouped.setdefault(name[: -len(tensor_suffix)] + ".weight", {})[tensor_suffix[1:]] = value
                break
        else:
            grouped.setdefault(name, {})["weight"] = value
    return grouped


def _load_each(header: GGUFHeader, progress) -> dict[str, dict[str, mx.array]]:
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    total = sum(t.nbytes for t in header.tensors)
    done, out = 0, {}
    started, reported = time.monotonic(), time.monotonic()
    for tensor in header.tensors:
        raw = data[tensor.offset: tensor.offset + tensor.nbytes]
        out[tensor.name] = _convert_tensor(tensor, raw)
        done += tensor.nbytes
        if progress is not None:
            progress(done, total)
        elif time.monotonic() - reported > 5:
            reported = time.monotonic()
            log.info("converting %s: %.0f%% (%.0fs)", header.path.name, 100 * done / total,
                     reported - started)
    return out


def _convert_tensor(tensor: TensorInfo, raw: np.ndarray) -> dict[str, mx.array]:
    shape = tensor.shape
    if tensor.type_id == F32:
        return {"weight": mx.array(raw.view(np.float32).reshape(shape))}
    if tensor.type_id == F16:
        return {"weight": mx.array(raw.view(np.float16).reshape(shape))}
    if tensor.type_id == BF16:
        as_f32 = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return {"weight": mx.array(as_f32.reshape(shape)).astype(mx.bfloat16)}
    if tensor.type_id in _KEPT_BITS:
        repack = _repack_q4_k if tensor.type_id == Q4_K else _repack
        weight, scales, biases = repack(tensor.type_id, raw, shape)
        return {"weight": weight, "scales": scales, "biases": biases}
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(np.asarray(raw), GGMLQuantizationType(tensor.type_id)).astype(np.float32)
    values = mx.array(values.reshape(shape))
    if len(shape) < 2:
        return {"weight": values}
    weight, scales, biases = mx.quantize(values, group_size=GROUP_SIZE, bits=requant_bits(tensor.type_id))
    return {"weight": weight, "scales": scales.astype(mx.float16), "biases": biases.astype(mx.float16)}


def _repack(type_id: int, raw: np.ndarray, shape: tuple[int, ...]):
    """GGML Q4_0 / Q4_1 / Q8_0 blocks of 32 as MLX affine quantization (w = scale*q + bias),
    exactly: Q8_0 is d*q with q in [-128, 127], Q4_0 is d*(q-8), Q4_1 is d*q + m."""
    rows = int(np.prod(shape[:-1]))
    groups = shape[-1] // GROUP_SIZE
    if type_id == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16)[:, 0]
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        packed = q.reshape(rows, -1).copy().view(np.uint32)
        scales, biases = d, (d.astype(np.float32) * -128).astype(np.float16)
    else:
        size = 18 if type_id == Q4_0 else 20
        blocks = raw.reshape(-1, size)
        d = blocks[:, :2].copy().view(np.float16)[:, 0]
        if type_id == Q4_0:
            biases, qs = (d.astype(np.float32) * -8).astype(np.float16), blocks[:, 2:]
        else:
            biases, qs = blocks[:, 2:4].copy().view(np.float16)[:, 0], blocks[:, 4:]
        # GGML: byte j holds element j (low nibble) and j+16 (high); MLX packs element k of
        # a uint32 at bits 4k, i.e. byte b holds elements 2b (low) and 2b+1 (high).
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        packed_bytes = values[:, 0::2] | (values[:, 1::2] << 4)
        packed = packed_bytes.reshape(rows, -1).copy().view(np.uint32)
        scales = d
    out_shape = (*shape[:-1], -1)
    return (mx.array(packed.reshape(out_shape)),
            mx.array(scales.reshape(rows, groups).reshape(out_shape)),
            mx.array(biases.reshape(rows, groups).reshape(out_shape)))


def _repack_q4_k(type_id: int, raw: np.ndarray, shape: tuple[int, ...]):
    """GGML Q4_K as MLX 4-bit affine, group 32: each super-block of 256 is eight groups of 32
    with w = (d * sc) * q - dmin * m, q in [0, 15] and 6-bit sc, m, i.e. affine per group.
    Only the products d * sc and dmin * m are rounded (to float16: 2^-11 relative, far below
    the 4-bit step), where re-quantizing the dequantized values would round every weight again."""
    from gguf.quants import Q4_K as Q4K

    rows = int(np.prod(shape[:-1]))
    blocks = raw.reshape(-1, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4K.get_scale_min(blocks[:, 4:16])
    scales = (d * sc.astype(np.float32)).astype(np.float16)
    biases = (-(dmin * m.astype(np.float32))).astype(np.float16)
    # Each 32-byte run of qs holds group 2j in its low nibbles and group 2j + 1 in its high ones.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    values = (qs & 0x0F).reshape(n * 8, 32)
    packed = (values[:, 0::2] | (values[:, 1::2] << 4)).reshape(rows, -1).copy().view(np.uint32)
    out_shape = (*shape[:-1], -1)
    return (mx.array(packed.reshape(out_shape)),
            mx.array(scales.reshape(out_shape)),
            mx.array(biases.reshape(out_shape)))
