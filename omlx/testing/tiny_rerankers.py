"""Build small but real reranker folders on the spot: cross-encoders of each supported family
(BERT, XLM-RoBERTa, ModernBERT) and a Qwen3-Reranker-style LLM reranker.

Each is laid out as the hub has them: `config.json` with the `*ForSequenceClassification`
architecture, random weights in `model.safetensors` under Hugging Face's parameter names,
and a `tokenizer.json` whose post-processor is the family's pair template (BERT's
`[CLS] a [SEP] b [SEP]` with token types 0/1, XLM-RoBERTa's `<s> a </s></s> b </s>`), trained
on the same built-in corpus as the tiny chat models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .tiny_models import TinyModelSpec, _random_model, _training_corpus, _write_folder, build_tokenizer


@dataclass(frozen=True)
class TinyCrossEncoderSpec:
    family: str = "bert"  # "bert", "xlm-roberta" or "modernbert"
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    max_length: int = 64  # tokens per (query, document) pair
    vocab_size: int = 400
    num_labels: int = 1
    seed: int = 0
    classifier_pooling: str = "cls"  # ModernBERT only


# A MiniLM-L6-sized BERT cross-encoder (ms-marco-MiniLM-L-6-v2's shape) for benchmarks.
MINILM_L6 = TinyCrossEncoderSpec(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                 intermediate_size=1536, max_length=512, vocab_size=30522)

_ARCHITECTURES = {
    "bert": "BertForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "modernbert": "ModernBertForSequenceClassification",
}


def _pair_tokenizer(spec: TinyCrossEncoderSpec):
    """(tokenizer, tokenizer_config) in the family's style."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = _training_corpus()
    if spec.family == "xlm-roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(
            vocab_size=spec.vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False))
        bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
        config = {"tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                  "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>",
                  "mask_token": "<unk>"}
        return tokenizer, config
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if spec.family == "bert":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, special_tokens=specials, show_progress=False)
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    else:  # ModernBERT: a byte-level BPE with BERT's markers
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    tokenizer.train_from_iterator(corpus, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    config.update({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                   "mask_token": "[MASK]"})
    return tokenizer, config


def cross_encoder_config(spec: TinyCrossEncoderSpec, vocab_size: int, pad_token_id: int) -> dict:
    config = {
        "architectures": [_ARCHITECTURES[spec.family]],
        "model_type": spec.family,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
        "id2label": {str(i): f"LABEL_{i}" for i in range(spec.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(spec.num_labels)},
        "torch_dtype": "float32",
    }
    if spec.family == "bert":
        config.update(max_position_embeddings=spec.max_length, type_vocab_size=2, layer_norm_eps=1e-12,
                      hidden_act="gelu")
    elif spec.family == "xlm-roberta":
        # Positions start after the padding id, as in RoBERTa.
        config.update(max_position_embeddings=spec.max_length + pad_token_id + 1, type_vocab_size=1,
                      layer_norm_eps=1e-5, hidden_act="gelu")
    else:
        config.update(max_position_embeddings=spec.max_length, norm_eps=1e-5, norm_bias=False,
                      global_attn_every_n_layers=2, local_attention=8, classifier_pooling=spec.classifier_pooling,
                      hidden_activation="gelu", classifier_activation="gelu")
    return config


def build_cross_encoder_folder(path: str | Path, spec: TinyCrossEncoderSpec | None = None) -> Path:
    """Write a random cross-encoder of `spec.family` into `path`."""
    from omlx.rerank.cross_encoder import build_cross_encoder

    spec = spec or TinyCrossEncoderSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _pair_tokenizer(spec)
    vocab = max(spec.vocab_size, tokenizer.get_vocab_size())
    pad = tokenizer.token_to_id(tokenizer_config["pad_token"])
    config = cross_encoder_config(spec, vocab, pad)
    mx.random.seed(spec.seed)
    model = build_cross_encoder(config)
    weights = dict(tree_flatten(model.parameters()))
    # Random heads give logits near zero; a wider spread makes the order of documents a real
    # check rather than float noise.
    for name in weights:
        if name.startswith("classifier.") and name.endswith("weight"):
            weights[name] = weights[name] * 8.0
    mx.save_safetensors(str(path / "model.safetensors"), {k: v.astype(mx.float32) for k, v in weights.items()},
                        metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config["model_max_length"] = spec.max_length
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def build_llm_reranker(path: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """A tiny qwen3 causal LM whose vocabulary has single "yes" and "no" tokens (what a
    Qwen3-Reranker is scored on); name its folder like one ("...-Reranker...") or set
    `is_original_qwen3_reranker` in `spec.extra_config` for discovery to see a reranker."""
    from tokenizers import AddedToken

    spec = spec or TinyModelSpec(seed=5)
    tokenizer = build_tokenizer(spec.vocab_size)
    tokenizer.add_tokens([AddedToken(word, normalized=False, special=False) for word in ("yes", "no")])
    model, config = _random_model(spec, tokenizer)
    model.lm_head.weight = model.lm_head.weight * spec.logit_scale
    return _write_folder(Path(path), spec, config, model, tokenizer)
