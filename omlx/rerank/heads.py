"""Sequence-classification heads on mlx-embeddings encoders, in Hugging Face's parameter layout.

A cross-encoder checkpoint (`*ForSequenceClassification`) is an encoder plus a small head
that turns the pair's hidden states into one logit (or two: not relevant / relevant).
mlx-embeddings has the encoders but, for BERT and XLM-RoBERTa, not the heads; each head is
built here with HF's module names (`bert.*` + `classifier.*`, `roberta.*` +
`classifier.dense/out_proj`, `model.*` + `head.*` + `classifier.*`), so the checkpoint's
weights load as they are.

ModernBERT's head exists in mlx-embeddings, but its output is already squashed (sigmoid or
softmax, depending on its own reading of the config) and its default pooling is "mean"
where HF's is "cls"; building it here on mlx-embeddings' encoder keeps raw logits and HF's
defaults for every family alike.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def num_labels(config: dict) -> int:
    """HF's rule: `num_labels` if given, else the size of `id2label` (default 2)."""
    value = config.get("num_labels")
    if isinstance(value, int) and value > 0:
        return value
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else 2


class BertCrossEncoder(nn.Module):
    """BertForSequenceClassification: the pooler (tanh over [CLS]) then one linear layer."""

    def __init__(self, config: dict):
        super().__init__()
        from mlx_embeddings.models import bert

        self.bert = bert.Model(bert.ModelArgs.from_dict(config))
        self.classifier = nn.Linear(config["hidden_size"], num_labels(config))

    def __call__(self, input_ids, token_type_ids, attention_mask) -> mx.array:
        out = self.bert(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return self.classifier(out.pooler_output)


class RobertaClassificationHead(nn.Module):
    def __init__(self, hidden: int, labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, labels)

    def __call__(self, first_token: mx.array) -> mx.array:
        return self.out_proj(mx.tanh(self.dense(first_token)))


class XLMRobertaCrossEncoder(nn.Module):
    """XLMRobertaForSequenceClassification (the bge-reranker family): no pooler; a
    dense-tanh-linear head over the first token (<s>)."""

    def __init__(self, config: dict):
        super().__init__()
        from mlx_embeddings.models import xlm_roberta

        self.roberta = xlm_roberta.Model(xlm_roberta.ModelArgs.from_dict({**config, "add_pooling_layer": False}))
        self.classifier = RobertaClassificationHead(config["hidden_size"], num_labels(config))

    def __call__(self, input_ids, token_type_ids, attention_mask) -> mx.array:
        out = self.roberta(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.classifier(out.last_hidden_state[:, 0])


class ModernBertCrossEncoder(nn.Module):
    """ModernBertForSequenceClassification: pool ("cls" or "mean"), prediction head
    (dense, GELU, LayerNorm), then one linear layer."""

    def __init__(self, config: dict):
        super().__init__()
        from mlx_embeddings.models import modernbert

        args = modernbert.ModelArgs.from_dict(config)
        self.pooling = config.get("classifier_pooling") or "cls"
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unsupported classifier_pooling {self.pooling!r}")
        self.model = modernbert.ModernBertModel(args)
        self.head = modernbert.ModernBertPredictionHead(args)
        self.classifier = nn.Linear(config["hidden_size"], num_labels(config))

    def __call__(self, input_ids, token_type_ids, attention_mask) -> mx.array:
        hidden = self.model(input_ids, attention_mask=attention_mask, return_dict=True)["last_hidden_state"]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask[..., None].astype(hidden.dtype)
            pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
        return self.classifier(self.head(pooled))


# architecture name -> (head class, the config model_types it covers)
CROSS_ENCODERS = {
    "BertForSequenceClassification": BertCrossEncoder,
    "XLMRobertaForSequenceClassification": XLMRobertaCrossEncoder,
    "RobertaForSequenceClassification": XLMRobertaCrossEncoder,
    "ModernBertForSequenceClassification": ModernBertCrossEncoder,
}


def relevance(logits: mx.array) -> mx.array:
    """A score in [0, 1] per row: the sigmoid of a single logit, or the probability of the
    last (relevant) class when the head has several."""
    if logits.shape[-1] == 1:
        return mx.sigmoid(logits[:, 0])
    return mx.softmax(logits, axis=-1)[:, -1]
