"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers` tokenizer.json
plus tokenizer_config.json (chat template, special tokens) that mlx-lm loads like any other.

Two vocabulary kinds cover the llama family:
- "gpt2": byte-level BPE with its merge list (Qwen, SmolLM, Llama 3).  The pre-tokenizer
  split is not in the file, only its name (`tokenizer.ggml.pre`); the regexes below are the
  ones those names stand for in llama.cpp and the models' own tokenizer.json files.
- "llama": SentencePiece BPE (Llama 2, Mistral): pieces with scores, `▁` for spaces and
  <0xNN> byte fallbacks.  The merges are derived from the scores the way SentencePiece
  applies them: any two adjacent pieces whose concatenation is a piece, best score first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .header import GGUFError, GGUFHeader

log = logging.getLogger("omlx.gguf")

# GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = None  # tokenizers' ByteLevel(use_regex=True) is GPT-2's own split
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> (regex split before byte-level, digits one by one first)
PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False),
    "gpt-2": (_GPT2_SPLIT, False),
    "gpt2": (_GPT2_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
    "smollm": (_GPT2_SPLIT, True),
    "starcoder": (_GPT2_SPLIT, True),
    "refact": (_GPT2_SPLIT, True),
}


def build_tokenizer(header: GGUFHeader):
    """A `tokenizers.Tokenizer` for the file's vocabulary (header read with arrays=True)."""
    kind = header.get("tokenizer.ggml.model")
    tokens = header.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError("the file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = header.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(header, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(header, tokens, types)
    else:
        raise GGUFError(f"tokenizer kind {kind!r} is not supported for GGUF yet (gpt2 and llama are)")
    _register_added_tokens(tokenizer, tokens, types)
    _add_bos(tokenizer, header, tokens)
    return tokenizer


def _byte_level_bpe(header: GGUFHeader, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = header.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise GGUFError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges, which is missing")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise GGUFError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=False))
    pre = header.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        log.warning("unknown GGUF pre-tokenizer %r: splitting words as GPT-2 does", pre)
    split, digits = PRE_TOKENIZERS.get(pre, (_GPT2_SPLIT, False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores, types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, the best-scored result
    first (SentencePiece merges the adjacent pair that makes the highest-scoring piece)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found = []
    for piece, index in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-float(scores[index]), index, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_bpe(header: GGUFHeader, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = header.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError("a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores, one per token")
    unk_id = header.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and unk_id < len(tokens) else None
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, scores, types)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = []
    if header.get("tokenizer.ggml.add_space_prefix", True):
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    strip_first = 1 if header.get("tokenizer.ggml.add_space_prefix", True) else 0
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=strip_first, right=0),
    ])
    return tokenizer


def _register_added_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special (never split, dropped when decoding with
    skip_special_tokens); user-defined ones are matched whole but stay visible text."""
    from tokenizers import AddedToken

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)


def _add_bos(tokenizer, header: GGUFHeader, tokens: list[str]) -> None:
    from tokenizers import processors

    bos_id = header.get("tokenizer.ggml.bos_token_id")
    if not header.get("tokenizer.ggml.add_bos_token", False) or not isinstance(bos_id, int):
        return
    bos = tokens[bos_id]
    steps = [processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                           special_tokens=[(bos, bos_id)])]
    if tokenizer.post_processor is not None:
        steps.insert(0, tokenizer.post_processor)
    tokenizer.post_processor = processors.Sequence(steps)


def _token(header: GGUFHeader, key: str, tokens: list[str]) -> str | None:
    value = header.get(key)
    return tokens[value] if isinstance(value, int) and 0 <= value < len(tokens) else None


def eos_token_ids(header: GGUFHeader) -> list[int]:
    """End of sequence and end of turn (Llama 3's <|eot_id|>, ...): generation stops at any."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = header.get(key)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def write_tokenizer(header: GGUFHeader, folder: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    tokenizer = build_tokenizer(header)
    tokens = header.get("tokenizer.ggml.tokens")
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {
        "bos_token": _token(header, "tokenizer.ggml.bos_token_id", tokens),
        "eos_token": _token(header, "tokenizer.ggml.eos_token_id", tokens),
        "unk_token": _token(header, "tokenizer.ggml.unknown_token_id", tokens),
        "pad_token": _token(header, "tokenizer.ggml.padding_token_id", tokens),
    }
    template = header.get("tokenizer.chat_template")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(header.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(template, str) and template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in special.items() if v is not None}, indent=2, ensure_ascii=False))
