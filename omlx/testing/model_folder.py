"""The files of a generated checkpoint folder that the tiny multimodal fixtures write alike.

`tiny_models` (and the text fixtures built on it), `tiny_vlm` and `tiny_audio` build different
architectures but lay out the folder the same way a hub checkpoint is laid out: float32 safetensors weights with their `config.json`,
and the byte-level BPE tokenizer of `tiny_models` with its ChatML markup (`<|im_end|>` ends a
turn and a generation, `<|endoftext|>` pads) plus the family's media tokens, and a ChatML chat
template that places media parts as the family's markup.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten


def chatml_template(image_markup: str, audio_markup: str | None = None) -> str:
    """ChatML with list content: text parts verbatim, image parts (and with `audio_markup`,
    audio parts) as the family's placeholder markup, which its processor expands."""

    def literal(markup: str) -> str:
        return "{{- '" + markup.replace("'", "\\'") + "' }}"

    audio = ("{%- elif part.type == 'audio' or part.type == 'input_audio' %}" + literal(audio_markup)
             if audio_markup is not None else "")
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- if message.content is string %}{{- message.content }}"
        "{%- else %}{%- for part in message.content %}"
        "{%- if part.type == 'image' or part.type == 'image_url' %}" + literal(image_markup) + audio +
        "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def write_weights(path: Path, model, config: dict) -> None:
    """Save `model`'s parameters as float32 safetensors next to its `config.json`."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))


def write_chatml_tokenizer(path: Path, tokenizer, *, max_length: int, chat_template: str,
                           markup: list[str], special: set[str], extra: dict | None = None,
                           template_file: bool = True, eos_token_id: int | None = None) -> None:
    """Write the tokenizer files transformers / mlx-lm / mlx-vlm load: `markup` are the added
    tokens (those in `special` flagged special), `extra` more `tokenizer_config.json` keys (what
    a family's processor reads its media tokens from).  `template_file`: the chat template also
    in `chat_template.json`, where multimodal processors look for it (text checkpoints keep it in
    `tokenizer_config.json` only).  `eos_token_id`: what generation stops on, by default
    `<|im_end|>`."""
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_length,
        "chat_template": chat_template,
        **(extra or {}),
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {
                "content": t, "special": t in special, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False,
            }
            for t in markup
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    if template_file:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))
    eos = tokenizer.token_to_id("<|im_end|>") if eos_token_id is None else eos_token_id
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
