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
defaults for every family alike.  The encoders' activations are set to what the config names
(mlx-embeddings hard-codes them) and fused (see `_gelu_kernel`).
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("omlx.rerank")

# HF activation names that mean the tanh approximation; "gelu" itself is the erf form.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_approx")


@functools.cache
def _gelu_kernel():
    """HF's exact (erf) GELU compiled into one fused elementwise kernel, or plain if this
    machine cannot compile.  On the CPU the activation of a MiniLM-sized feed-forward layer
    costs more than the layer's 384x1536 matmul (MLX's elementwise erf is slow there); fused
    it was 10-25% faster in an alternating A/B on a busy 2-core machine (median 151 against
    169 ms for 16 x 83 x 1536 values)."""
    compiled = mx.compile(nn.gelu, shapeless=True)
    try:
        mx.eval(compiled(mx.zeros((2, 3))))
        return compiled
    except Exception as exc:  # no JIT toolchain: correct, only slower
        log.warning("cannot compile the GELU kernel (%s); using the unfused one", exc)
        return nn.gelu


class GELU(nn.Module):
    def __init__(self, name: str = "gelu"):
        super().__init__()
        self.tanh = name in _TANH_GELUS

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu_approx(x) if self.tanh else _gelu_kernel()(x)


class DenseGELU(nn.Module):
    """A feed-forward intermediate layer (BERT-style `intermediate.dense`) with its GELU."""

    def __init__(self, dense: nn.Linear, activation: str):
        super().__init__()
        self.dense = dense
        self.act = GELU(activation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


def _bert_style_activations(layers, config: dict) -> None:
    """mlx-embeddings' BERT and XLM-RoBERTa apply an unfused GELU whatever the config says;
    use the config's, fused (parameter names stay `intermediate.dense.*`)."""
    for layer in layers:
        layer.intermediate = DenseGELU(layer.intermediate.dense, config.get("hidden_act") or "gelu")


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
        _bert_style_activations(self.bert.encoder.layer, config)
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
        _bert_style_activations(self.roberta.encoder.layer, config)
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
        # mlx-embeddings uses the tanh approximation throughout; HF's ModernBERT uses the
        # activations its config names (the erf GELU by default).
        for layer in self.model.layers:
            layer.mlp.act = GELU(config.get("hidden_activation") or "gelu")
        self.head.act = GELU(config.get("classifier_activation") or "gelu")
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
