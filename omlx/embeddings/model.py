"""An embedding model loaded through mlx-embeddings: tokenize, batch-forward, pool, normalise.

Pooling follows the model's sentence-transformers config (`1_Pooling/config.json`: mean, CLS
or last token) when it has one, so vectors match what sentence-transformers computes for the
same checkpoint; otherwise the model class's own pooled output is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omlx.models.discovery import DiscoveredModel
from omlx.models.resident import EncoderResident, EncoderStats

log = logging.getLogger("omlx.embeddings")

DEFAULT_MAX_LENGTH = 512


def pooling_mode(path: Path) -> str | None:
    """"mean", "cls" or "lasttoken" from sentence-transformers' pooling config, else None."""
    try:
        config = json.loads((path / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_lasttoken"):
        return "lasttoken"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return None


def max_sequence_length(path: Path, config: dict) -> int:
    """sentence-transformers' `max_seq_length` (what it truncates to), else the position
    embedding size."""
    try:
        value = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    except (OSError, ValueError):
        pass
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_LENGTH


@dataclass
class LoadedEmbedder(EncoderResident):
    info: DiscoveredModel
    model: object  # an mlx-embeddings model
    tokenizer: object  # mlx-embeddings TokenizerWrapper (a transformers tokenizer inside)
    max_length: int
    pooling: str | None
    weights_bytes: int
    loaded_at: float
    stats: EncoderStats = field(default_factory=EncoderStats)
    batcher: object | None = None  # omlx.embeddings.batcher.EmbeddingBatcher, made on first use

    @property
    def vocab_size(self) -> int:
        return int(self.info.config.get("vocab_size") or len(self.tokenizer))

    @property
    def dimensions(self) -> int:
        return int(self.info.config.get("hidden_size") or 0)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True, truncation=True,
                                          max_length=self.max_length))

    def embed_token_ids(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass over a padded batch -> `[len(batch), hidden]` unit vectors (float32)."""
        import mlx.core as mx
        from mlx_embeddings.models.base import mean_pooling, normalize_embeddings

        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((len(batch), width), pad, dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.int32)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        input_ids, attention = mx.array(ids), mx.array(mask)
        output = self.model(input_ids, attention_mask=attention)
        hidden = output.last_hidden_state
        if self.pooling == "mean" or (self.pooling is None and output.text_embeds is None):
            pooled = mean_pooling(hidden, attention)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "lasttoken":
            last = mx.array([len(t) - 1 for t in batch])
            pooled = hidden[mx.arange(len(batch)), last]
        else:
            pooled = output.text_embeds
        vectors = normalize_embeddings(pooled.astype(mx.float32))
        mx.eval(vectors)
        self.stats.batches += 1
        self.stats.inputs += len(batch)
        self.stats.tokens += sum(len(t) for t in batch)
        return np.array(vectors, dtype=np.float32)

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.model = None


def load_embedder(info: DiscoveredModel) -> LoadedEmbedder:
    """Load with mlx-embeddings (blocking; the pool calls this in a worker thread)."""
    import time

    from mlx_embeddings.utils import load

    from omlx.models.facts import parameter_bytes

    started = time.monotonic()
    model, tokenizer = load(str(info.path))
    packed = pack_linears(model, tokenizer)
    embedder = LoadedEmbedder(
        info=info,
        model=model,
        tokenizer=tokenizer,
        max_length=max_sequence_length(info.path, info.config),
        pooling=pooling_mode(info.path),
        weights_bytes=parameter_bytes(model),
        loaded_at=time.time(),
    )
    log.info("loaded embedding model %s in %.1fs (%s pooling, max %d tokens%s)", info.model_id,
             time.monotonic() - started, embedder.pooling or "model's own", embedder.max_length,
             f", {packed} linear layers packed bf16" if packed else "")
    return embedder


def pack_linears(model, tokenizer) -> int:
    """Pack the encoder's linear layers bf16 where that path runs here (1.4-1.6x the float32
    batch at cosine >= 0.9999 on all-MiniLM-L6-v2: bench/encoder_bf16_bench.py); checked by
    one short forward pass.  Returns the number packed."""
    import mlx.core as mx

    from omlx.models.packed_encoders import pack_encoder, should_pack_encoder

    if not should_pack_encoder(model):
        return 0
    ids = mx.array([list(tokenizer.encode("probe", add_special_tokens=True))])
    return pack_encoder(model, lambda: model(ids, attention_mask=mx.ones(ids.shape, mx.int32)).last_hidden_state)
