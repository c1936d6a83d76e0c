"""A VLM's vision tower (and its projector) with linear layers packed bf16, at load.

bench/encoder_bf16_bench.py: one 224x224 image through a ViT-B-wide tower ran 1.4x (Qwen2-VL)
and 1.6x (CLIP) faster packed than float32 at a cosine similarity >= 0.99999 per feature, and
16x faster than the same tower from a bf16 checkpoint as mlx-vlm loads it (MLX's CPU bf16
matmul does not use BLAS).  So where the packed path is chosen, the tower is packed
(omlx/models/packed_encoders.py), checked by one small image through the model's own
processor and `get_input_embeddings`, the path every image request takes.  A family whose
processor or tower the check cannot run keeps its tower as loaded.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np

from omlx.models.packed_encoders import pack_encoder, should_pack_encoder

log = logging.getLogger("omlx.vision")

# The modules image features go through, where the family has them.
IMAGE_PATH_MODULES = ("vision_tower", "multi_modal_projector")


def image_probe(side):
    """A callable running one small grey image through the model's own image path (its
    processor, then `get_input_embeddings`), or None where that cannot be set up."""
    from PIL import Image

    from .images import DecodedImage
    from .prompt import prepare

    marker = getattr(side.processor, "image_token", None)
    if not isinstance(marker, str) or not marker or side.image_token_id is None:
        return None
    try:
        image = DecodedImage(Image.new("RGB", (64, 64), (120, 130, 140)), b"tower-probe")
        ids, multimodal = prepare(side.processor, side.image_token_id, marker, [image])
    except Exception as exc:  # noqa: BLE001 - no probe, no packing
        log.debug("vision tower probe unavailable: %s", exc)
        return None
    arrays = {k: mx.array(v) for k, v in multimodal.arrays.items()}
    pixels = arrays.pop("pixel_values")
    tokens = mx.array(np.asarray(ids))[None]

    def run():
        return side.vlm.get_input_embeddings(tokens, pixels, **arrays).inputs_embeds

    return run


def pack_tower(side, setting: bool | None = None) -> int:
    """Pack the image path's linear layers where the packed path runs here; returns the
    number of layers packed (0: the tower stays as loaded)."""
    vlm = side.vlm
    modules = [getattr(vlm, name) for name in IMAGE_PATH_MODULES if getattr(vlm, name, None) is not None]
    if not modules or not any(should_pack_encoder(m, setting) for m in modules):
        return 0
    probe = image_probe(side)
    if probe is None:
        log.info("vision tower kept as loaded: no image probe for %s", side.family)
        return 0
    try:
        mx.eval(probe())  # the unpacked path must run first, or a failure would be misread
    except Exception as exc:  # noqa: BLE001
        log.info("vision tower kept as loaded: its probe fails before packing (%s)", exc)
        return 0
    packed = 0
    for module in modules:
        packed += pack_encoder(module, probe)
    return packed
