"""A cross-encoder reranker loaded from a `*ForSequenceClassification` folder: pair encoding
with the tokenizer's own template, batched forward passes, one relevance score per pair.

Pairs are encoded by the model's tokenizer as (query, document) pairs, so each family gets
its own template and token type ids (`[CLS] q [SEP] d [SEP]` with types 0/1 for BERT,
`<s> q </s></s> d </s>` for XLM-RoBERTa) and truncation cuts the document, never the query.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omlx.models.discovery import DiscoveredModel
from omlx.models.resident import EncoderResident, EncoderStats

from .chunks import document_pieces
from .heads import CROSS_ENCODERS, num_labels, relevance

log = logging.getLogger("omlx.rerank")

DEFAULT_MAX_LENGTH = 512
_ROBERTA_TYPES = ("xlm-roberta", "roberta")


class QueryTooLong(ValueError):
    """The query alone leaves no room for a document in the model's context."""


class UnsupportedReranker(ValueError):
    """A reranker folder this server cannot load (its family, or its head)."""


@dataclass
class LoadedCrossEncoder(EncoderResident):
    info: DiscoveredModel
    model: object  # an omlx.rerank.heads cross-encoder module
    tokenizer: object  # a transformers tokenizer
    max_length: int
    weights_bytes: int
    loaded_at: float
    stats: EncoderStats = field(default_factory=EncoderStats)
    batcher: object | None = None  # omlx.embeddings.batcher.PassBatcher, made on first use

    def encode_pairs(self, query: str, documents: list[str], max_chunks: int = 1,
                     max_doc_tokens: int | None = None) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """Token rows `(input_ids, token_type_ids)` for every (query, document piece) pair,
        and for each row the index of the document it came from."""
        room = self.max_length - len(self.tokenizer(query, "")["input_ids"])
        if room < 1:
            raise QueryTooLong(f"the query is too long for this model's {self.max_length}-token context")
        texts, owners = [], []
        for index, document in enumerate(documents):
            for piece in document_pieces(self.tokenizer, document, room, max_chunks, max_doc_tokens):
                texts.append(piece)
                owners.append(index)
        encoded = self.tokenizer([query] * len(texts), texts, truncation="only_second",
                                 max_length=self.max_length)
        types = encoded.get("token_type_ids") or [[0] * len(ids) for ids in encoded["input_ids"]]
        return [(list(ids), list(t)) for ids, t in zip(encoded["input_ids"], types)], owners

    def score_rows(self, rows: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """One forward pass over a padded batch of pairs -> a relevance score per row."""
        import mlx.core as mx

        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((len(rows), width), pad, dtype=np.int32)
        types = np.zeros((len(rows), width), dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.float32)
        for row, (tokens, type_ids) in enumerate(rows):
            ids[row, : len(tokens)] = tokens
            types[row, : len(tokens)] = type_ids
            mask[row, : len(tokens)] = 1.0
        scores = relevance(self.model(mx.array(ids), mx.array(types), mx.array(mask)).astype(mx.float32))
        mx.eval(scores)
        self.stats.batches += 1
        self.stats.inputs += len(rows)
        self.stats.tokens += sum(len(t) for t, _ in rows)
        return np.array(scores, dtype=np.float32)

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.model = None


def max_pair_length(config: dict, tokenizer) -> int:
    """Tokens a pair may take: the tokenizer's `model_max_length` where it is a real limit,
    within the position embeddings (RoBERTa-style models start positions after the padding
    id, so they hold `pad_token_id + 1` fewer)."""
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        if config.get("model_type") in _ROBERTA_TYPES:
            positions -= int(config.get("pad_token_id", 1)) + 1
    else:
        positions = DEFAULT_MAX_LENGTH
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < 1_000_000:
        return min(stated, positions)
    return positions


def build_cross_encoder(config: dict):
    """The head module for this config (random weights), or UnsupportedReranker."""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    head = next((CROSS_ENCODERS[a] for a in architectures if a in CROSS_ENCODERS), None)
    if head is None:
        raise UnsupportedReranker(
            f"cross-encoder architecture {', '.join(architectures) or 'unknown'} is not supported "
            f"(supported: {', '.join(sorted(CROSS_ENCODERS))})")
    if num_labels(config) > 2:
        raise UnsupportedReranker(f"a sequence classifier with {num_labels(config)} labels is not a "
                                  "reranker (one relevance logit, or two classes, expected)")
    return head(config)


def load_cross_encoder(info: DiscoveredModel) -> LoadedCrossEncoder:
    """Load the folder's weights into its head module (blocking; the pool calls this in a
    worker thread)."""
    import mlx.core as mx
    import mlx.nn as nn
    from transformers import AutoTokenizer

    from omlx.models.facts import parameter_bytes

    started = time.monotonic()
    path = Path(info.path)
    config = json.loads((path / "config.json").read_text())
    model = build_cross_encoder(config)
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    weights = sanitize(weights)
    quantization = config.get("quantization")
    if isinstance(quantization, dict):  # MLX-quantized: quantize the layers that were
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda name, _: f"{name}.scales" in weights)
    elif mx.default_device() == mx.cpu:
        # float32 is the fast dtype on CPU (half precision matmuls do not go through BLAS).
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    packed = pack_linears(model, tokenizer)
    loaded = LoadedCrossEncoder(info=info, model=model, tokenizer=tokenizer,
                                max_length=max_pair_length(config, tokenizer),
                                weights_bytes=parameter_bytes(model), loaded_at=time.time())
    log.info("loaded cross-encoder %s (%s) in %.1fs, pairs up to %d tokens%s", info.model_id,
             info.architecture, time.monotonic() - started, loaded.max_length,
             f", {packed} linear layers packed bf16" if packed else "")
    return loaded


def pack_linears(model, tokenizer) -> int:
    """Pack the cross-encoder's linear layers bf16 where that path runs here (half the weight
    bytes; 1.03-1.3x the float32 batch, whose time GELU and attention dominate, with the
    scores' order unchanged: bench/encoder_bf16_bench.py); checked by one pair's forward
    pass.  Returns the number packed."""
    import mlx.core as mx

    from omlx.models.packed_encoders import pack_encoder, should_pack_encoder

    if not should_pack_encoder(model):
        return 0
    encoded = tokenizer("probe", "probe")
    ids = mx.array([encoded["input_ids"]])
    types = mx.array([encoded.get("token_type_ids") or [0] * ids.shape[1]])
    return pack_encoder(model, lambda: model(ids, types, mx.ones(ids.shape)))


def sanitize(weights: dict) -> dict:
    """Checkpoint names as the modules expect them: no `position_ids` buffers or unused
    poolers, and LayerNorm
    parameters under their current names (old BERT exports say gamma / beta)."""
    out = {}
    for name, value in weights.items():
        # RoBERTa-style classifiers have no pooler, though some exports carry its weights.
        if name.endswith("position_ids") or name.startswith("roberta.pooler."):
            continue
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        out[name] = value
    return out
