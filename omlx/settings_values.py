"""How one settings value is checked or parsed: sizes, numbers, booleans, sampling objects,
and the error that names a bad one.

A leaf: it imports nothing of omlx, so both settings formats (omlx.settings and the oMLX
translation in omlx.settings_omlx), the CLI and the admin API use the same checks without
importing one another.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

MODEL_TYPES = ("llm", "vlm", "ocr", "embedding", "reranker")
# What a KV pool may store keys and values in (omlx.scheduler.kv_dtype): auto picks.
KV_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Request-body keys a user may give defaults for, and the type check each default must pass
# (the range checks stay in the API's own request parser, which sees the merged body).
NUMBER = (int, float)
SAMPLING_KEYS: dict[str, tuple] = {
    "temperature": NUMBER,
    "top_p": NUMBER,
    "top_k": (int,),
    "min_p": NUMBER,
    "repetition_penalty": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "seed": (int,),
    "stop": (str, list),
}


class SettingsError(ValueError):
    """A settings value that cannot be used; `field` names it for the API's error."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------- sizes


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
GIB = 2**30


def parse_bytes(value: Any, field: str = "size") -> int:
    """`8GB`, `8 GiB`, `512M`, `1.5g` or a plain number of bytes -> bytes (binary units)."""
    if isinstance(value, bool):
        raise SettingsError(f"{field} must be a size like '8GB', got {value!r}", field)
    if isinstance(value, (int, float)):
        if value <= 0:
            raise SettingsError(f"{field} must be positive, got {value}", field)
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = match.groups()
            size = float(number) * _UNITS[(unit or "").lower()[:1]]
            if size > 0:
                return int(size)
    raise SettingsError(f"{field} must be a size like '8GB' or a number of bytes, got {value!r}", field)


def gib_to_bytes(gib: float) -> int:
    """Settings give memory caps in GiB (`kv_cache_gb`, `kv_disk_gb`); engines count bytes."""
    return int(gib * GIB)


# ---------------------------------------------------------------------------- JSON values


def check_type(value, types: tuple, field: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise SettingsError(f"'{field}' must be {_type_names(types)}, got a boolean", field)
    if not isinstance(value, types):
        raise SettingsError(f"'{field}' must be {_type_names(types)}, got {type(value).__name__}", field)


def _type_names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", bool: "a boolean"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def validate_sampling(sampling: Any, field: str = "sampling") -> dict:
    check_type(sampling, (dict,), field)
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise SettingsError(
                f"'{field}.{key}' is not a sampling setting (known: {', '.join(SAMPLING_KEYS)})",
                f"{field}.{key}",
            )
        if value is not None:
            check_type(value, SAMPLING_KEYS[key], f"{field}.{key}")
    return dict(sampling)


def optional_sampling(value, field: str):
    return None if value is None else validate_sampling(value, field)


def optional_positive(value, field: str, types=NUMBER):
    if value is None:
        return None
    check_type(value, types, field)
    if value <= 0:
        raise SettingsError(f"'{field}' must be positive, got {value}", field)
    return value


def optional_positive_int(value, field: str):
    return optional_positive(value, field, (int,))


def optional_non_negative_int(value, field: str):
    if value is None:
        return None
    check_type(value, (int,), field)
    if value < 0:
        raise SettingsError(f"'{field}' must be 0 or more, got {value}", field)
    return value


def optional_size(value, field: str):
    return None if value is None else parse_bytes(value, field)


def model_type(value, field="model_type"):
    if value is not None and value not in MODEL_TYPES:
        raise SettingsError(f"'{field}' must be one of {', '.join(MODEL_TYPES)}, got {value!r}", field)
    return value


def typed(*types) -> Callable:
    def check(value, field):
        if value is not None:
            check_type(value, types, field)
        return value
    return check


def string_list(value, field: str):
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise SettingsError(f"'{field}' must be a list of strings", field)
    return value


def kv_bits(value, field: str):
    if value is not None and value not in (0, 4, 8):
        raise SettingsError(f"'{field}' must be 4, 8 or 0 (unquantized), got {value!r}", field)
    return value


def kv_dtype(value, field: str):
    if value is not None and value not in KV_DTYPES:
        raise SettingsError(f"'{field}' must be one of {', '.join(KV_DTYPES)}, got {value!r}", field)
    return value


# ---------------------------------------------------------------------------- env / flag text


def non_negative_int_text(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def kv_dtype_text(text: str) -> str:
    value = text.strip().lower()
    if value not in KV_DTYPES:
        raise ValueError(f"expected one of {', '.join(KV_DTYPES)}, got {text!r}")
    return value


def bool_text(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def dirs_text(text: str) -> list[str]:
    # oMLX separates dirs with commas, the shell's PATH convention with os.pathsep.
    return [part.strip() for chunk in text.split(",") for part in chunk.split(os.pathsep) if part.strip()]


def gib_from_size(text: str) -> float:
    return parse_bytes(text, "size") / GIB
