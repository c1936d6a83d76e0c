"""Build small but real MLX chat models on the spot.

Nothing can be downloaded on the machines omlx is developed and tested on, so tests,
benchmarks and the demo model all come from here: a real mlx-lm architecture (qwen3 or
llama) with random weights saved as safetensors, and a byte-level BPE tokenizer trained on
a built-in corpus with a ChatML chat template.  `mlx_lm.load(path)` loads the result
exactly like a model from the hub.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .model_folder import write_chatml_tokenizer, write_weights

# A ChatML template in the Qwen / Hermes style: tools listed in the system turn, calls as
# `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in assistant turns, results as
# `<tool_response>` in a user turn, reasoning as `<think>...</think>`.  mlx-lm infers its
# `json_tools` parser from the `<tool_call>` and `tool_call.name` it finds here, so the
# tokenizer reports tool calling the way it does for real Qwen checkpoints.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools>\\n\\nTo call a function, answer with its name and arguments as JSON:\\n"
    "<tool_call>\\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\\n</tool_call>"
    "<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content or '' }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Control tokens (special: dropped by decode(skip_special_tokens)) and markup tokens that are
# single tokens in Qwen-style vocabularies but part of the visible text.
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
SPECIAL_TOKENS = CONTROL_TOKENS + MARKUP_TOKENS

# The tokenizer's training vocabulary; benchmarks draw prompts from it too, so that most
# words are single tokens.
WORDS = (
    "the a an of to in is it that for on with as was are be this by at from or have "
    "model server token request batch cache block prefix prompt stream client agent "
    "code function return value error test python json data memory fast slow queue "
    "hello world please write explain summarize list tell me about how what why when "
    "system user assistant tool call result answer question think reason step plan "
    "one two three four five six seven eight nine ten red green blue cat dog bird tree "
    "river mountain city house car road book paper music light dark time day night"
).split()


def _training_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 18)
        line = " ".join(rng.choice(WORDS) for _ in range(n))
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.1:
            line += " " + str(rng.randint(0, 10_000))
        lines.append(line)
    lines.append("{\"key\": [1, 2.5, true, null], \"name\": \"x_y-z\"} <>/\\'`~@#$%^&*()+=|;")
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style, like Qwen's) trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return tokenizer


@dataclass
class TinyModelSpec:
    """Shape of a generated model.  Defaults give a ~1M-parameter qwen3 that runs fast on CPU."""

    model_type: str = "qwen3"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    seed: int = 0
    # Random weights give nearly flat logits; scaling the output head spreads them so greedy
    # choices are well separated and token-exact comparisons test the engine, not float
    # rounding luck.  (Untied heads, since a tied random head just repeats its input token.)
    logit_scale: float = 8.0
    extra_config: dict = field(default_factory=dict)

    def config(self) -> dict:
        cfg = {
            "model_type": self.model_type,
            "architectures": [
                "Qwen3ForCausalLM" if self.model_type == "qwen3" else "LlamaForCausalLM"
            ],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "bos_token_id": None,
            "eos_token_id": 2,
        }
        cfg.update(self.extra_config)
        return cfg


# A ~200M-parameter qwen3 for benchmarks (float32 is the fast dtype on Linux CPU).
BENCH_200M = TinyModelSpec(
    hidden_size=1024,
    num_hidden_layers=12,
    intermediate_size=3072,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=32000,
    tie_word_embeddings=False,
    logit_scale=1.0,
    max_position_embeddings=8192,
)

# The model created on first start when the model dir is empty: small enough to build in
# seconds, big enough to look like a model.
DEMO = TinyModelSpec(
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=768,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    vocab_size=2048,
    logit_scale=4.0,
)


def _model_class(model_type: str):
    if model_type == "qwen3":
        from mlx_lm.models import qwen3 as module
    elif model_type == "llama":
        from mlx_lm.models import llama as module
    else:
        raise ValueError(f"unsupported tiny model type {model_type!r}")
    return module


def build_model(path: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer files for `spec` into `path`."""
    spec = spec or TinyModelSpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    model, config = _random_model(spec, tokenizer)
    if not spec.tie_word_embeddings:
        model.lm_head.weight = model.lm_head.weight * spec.logit_scale
        _discourage_thinking(model, tokenizer)
    return _write_folder(Path(path), spec, config, model, tokenizer)


def build_endless_model(path: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """A tiny model whose greedy replies never end by themselves: its end-of-turn row of the
    output head is zeroed (see _discourage_thinking for why greedy decoding then never picks
    it).  Streams run until max_tokens or until the server ends them: what tests of stops,
    queues and timeouts need."""
    spec = spec or TinyModelSpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    model, config = _random_model(spec, tokenizer)
    model.lm_head.weight = model.lm_head.weight * spec.logit_scale
    _discourage_thinking(model, tokenizer)
    head = model.lm_head.weight
    head[config["eos_token_id"]] = 0.0
    model.lm_head.weight = head
    return _write_folder(Path(path), spec, config, model, tokenizer)


def _discourage_thinking(model, tokenizer) -> None:
    """Keep the random model from opening or closing a thinking block by chance: it is not
    a reasoning model, and a stray `<think>` would turn the rest of a babbled reply into
    reasoning.  With a zero output row a think token's logit is 0, below the largest of
    hundreds of random logits, so greedy decoding never picks it; a logit_bias or a grammar
    can still force it.  (Tool-call markup keeps its random row: it is only parsed when a
    request offers tools.)
    """
    head = model.lm_head.weight
    for token in ("<think>", "</think>"):
        head[tokenizer.token_to_id(token)] = 0.0
    model.lm_head.weight = head


def build_scripted_model(path: str | Path, reply: list[str], spec: TinyModelSpec | None = None) -> Path:
    """A real model (random weights, then rewired) whose greedy answer to any chat prompt is
    `reply`, piece by piece, followed by end-of-turn.

    Output that tests can predict exactly, through the real engine and detokenizer, is what
    end-to-end tests of tool-call and reasoning parsing need; a random model only babbles.
    The rewiring: every attention and MLP output projection is zeroed, so the residual stream
    at each position is just the current token's embedding and the model becomes a bigram
    table.  Each token of the reply gets an orthogonal embedding and the output head maps it
    to the next one.  So each piece must be one token (pieces that are not get added to the
    vocabulary, as markup tokens are in real tokenizers) and no token may repeat.
    """
    spec = spec or TinyModelSpec(model_type="llama", seed=3)
    tokenizer = build_tokenizer(spec.vocab_size)
    from tokenizers import AddedToken

    new_pieces = [p for p in reply if tokenizer.token_to_id(p) is None]
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in new_pieces])
    model, config = _random_model(spec, tokenizer)

    # The generation prompt ends with "<|im_start|>assistant\n": its last token starts the chain.
    start = tokenizer.encode("<|im_start|>assistant\n").ids[-1]
    chain = [start] + [tokenizer.token_to_id(p) for p in reply] + [config["eos_token_id"]]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"a scripted reply may not repeat a token: {reply!r}")
    hidden = spec.hidden_size
    if len(chain) - 1 > hidden:
        raise ValueError(f"a reply of {len(reply)} pieces needs hidden_size > {len(reply)}")

    weights = dict(tree_flatten(model.parameters()))
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(weights[name])
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    embedding = weights[embed]
    lm_head = mx.zeros_like(weights[head])
    margin = 30.0  # logit of the scripted next token; every other logit is 0
    for k, (token, following) in enumerate(zip(chain, chain[1:])):
        basis = mx.zeros((hidden,)).at[k].add(1.0)
        # RMSNorm leaves a vector of RMS 1 unchanged, so the head sees sqrt(hidden) * basis.
        embedding[token] = basis * hidden**0.5
        lm_head[following] = basis * (margin / hidden**0.5)
    weights[embed], weights[head] = embedding, lm_head
    model.load_weights(list(weights.items()))
    return _write_folder(Path(path), spec, config, model, tokenizer, markup=SPECIAL_TOKENS + new_pieces)


def _random_model(spec: TinyModelSpec, tokenizer):
    # The trained vocabulary can be smaller than asked; the embedding keeps the full size
    # (as real models pad theirs), so ids never fall outside it.
    config = spec.config()
    config["vocab_size"] = max(spec.vocab_size, tokenizer.get_vocab_size())
    config["eos_token_id"] = tokenizer.token_to_id("<|im_end|>")
    module = _model_class(spec.model_type)
    mx.random.seed(spec.seed)
    return module.Model(module.ModelArgs.from_dict(config)), config


def _write_folder(path: Path, spec: TinyModelSpec, config: dict, model, tokenizer, markup=SPECIAL_TOKENS) -> Path:
    write_weights(path, model, config)
    write_chatml_tokenizer(path, tokenizer, max_length=spec.max_position_embeddings, chat_template=CHAT_TEMPLATE,
                           markup=markup, special=set(CONTROL_TOKENS), template_file=False,
                           eos_token_id=config["eos_token_id"])
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random MLX model folder.")
    parser.add_argument("path")
    parser.add_argument("--preset", choices=["tiny", "demo", "bench-200m"], default="tiny")
    parser.add_argument("--model-type", choices=["qwen3", "llama"], default=None)
    args = parser.parse_args(argv)
    spec = {"tiny": TinyModelSpec(), "demo": DEMO, "bench-200m": BENCH_200M}[args.preset]
    if args.model_type:
        spec = TinyModelSpec(**{**spec.__dict__, "model_type": args.model_type})
    print(build_model(args.path, spec))


if __name__ == "__main__":
    main()
