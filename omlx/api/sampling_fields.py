"""Sampling as a client asked for it, and as it runs once defaults fill the gaps.

Each API family accepts its own ranges (OpenAI's temperature goes to 2, Anthropic's to 1): a
client's value outside them is that API's 400.  Defaults come from the server's settings,
not from the client, so they are only held to what the engine can run at all; a default
outside that is logged and skipped, never turned into an error on a client's request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from omlx.scheduler import SamplingParams

from .errors import invalid
from .wire import number

log = logging.getLogger("omlx.api.sampling")

# What SamplingParams gets when neither the request nor any setting chose a value.
BUILTIN = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": None,
}
INTEGER_FIELDS = ("top_k", "seed")

# The widest values the engine runs; the OpenAI ranges, with temperature open-ended.
ENGINE_RANGES = {
    "temperature": (0.0, 1e6),
    "top_p": (0.0, 1.0),
    "top_k": (-1, 2**31 - 1),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 10.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "seed": (-(2**63), 2**64 - 1),
}
# Below this a temperature is greedy decoding: logits divided by it overflow float32 (and
# under ~1e-45 it is 0 in float32 itself), which would leave no distribution to sample from.
MIN_SAMPLING_TEMPERATURE = 1e-6
OPENAI_RANGES = {**ENGINE_RANGES, "temperature": (0.0, 2.0)}
ANTHROPIC_RANGES = {**ENGINE_RANGES, "temperature": (0.0, 1.0), "top_k": (0, 2**31 - 1)}


@dataclass
class SamplingRequest:
    """The sampling fields a client set; None means "not set" (a default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    @classmethod
    def parse(cls, body: dict, ranges: dict[str, tuple]) -> "SamplingRequest":
        """The fields of `body` this family accepts (`ranges`), each checked against its range."""
        values = {
            name: number(body, name, lo, hi, None, integer=name in INTEGER_FIELDS)
            for name, (lo, hi) in ranges.items()
        }
        return cls(**values, logit_bias=parse_logit_bias(body))

    def resolve(self, defaults: dict, forced: frozenset = frozenset()) -> SamplingParams:
        """Request > defaults > built-in; a `forced` field takes its default over the request's."""
        chosen = {}
        for name, builtin in BUILTIN.items():
            value = getattr(self, name)
            default = usable_default(name, defaults.get(name))
            if default is not None and (value is None or name in forced):
                value = default
            chosen[name] = builtin if value is None else value
        seed = chosen["seed"]
        temperature = float(chosen["temperature"])
        if temperature < MIN_SAMPLING_TEMPERATURE:
            temperature = 0.0  # greedy: what such a temperature means, and all float32 can hold
        return SamplingParams(
            temperature=temperature,
            top_p=float(chosen["top_p"]),
            top_k=max(0, int(chosen["top_k"])),
            min_p=float(chosen["min_p"]),
            seed=None if seed is None else int(seed) % 2**63,
            repetition_penalty=float(chosen["repetition_penalty"]),
            presence_penalty=float(chosen["presence_penalty"]),
            frequency_penalty=float(chosen["frequency_penalty"]),
            logit_bias=self.logit_bias,
        )


SAMPLING_FIELD_NAMES = tuple(f.name for f in fields(SamplingRequest) if f.name != "logit_bias")
_warned: set[tuple[str, object]] = set()


def usable_default(name: str, value):
    """A configured default the engine can run, else None (said once in the log)."""
    if value is None:
        return None
    lo, hi = ENGINE_RANGES[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if ok and name in INTEGER_FIELDS:
        ok = float(value).is_integer()
    if not ok:
        if (name, value) not in _warned:
            _warned.add((name, value))
            log.warning("the configured default %s=%r is outside what the engine runs (%s..%s); ignored",
                        name, value, lo, hi)
        return None
    return value


def parse_logit_bias(body: dict) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias", "invalid_value") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid("'logit_bias' values must be numbers between -100 and 100", "logit_bias", "invalid_value")
        if token < 0:
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias", "invalid_value")
        out[token] = float(value)
    return out or None
