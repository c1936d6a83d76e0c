"""The prefix cache's disk tier: blocks written behind the engine outlive it, load back into
a fresh engine (a restart) as cached tokens, never change outputs, and bad files are dropped."""

import json
import random
import struct

import pytest
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.disk_cache import DiskKVCache
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

BLOCK = 16
PROMPT = [random.Random(11).randrange(5, 500) for _ in range(150)]  # 9 full blocks + tail
MAX_NEW = 8
SCOPE = b"tiny-disk-test"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("disk") / "m", TinyModelSpec(seed=4))
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    return model, eos, greedy_reference(model, PROMPT, MAX_NEW, eos)


def make_engine(model, cache_dir, scope=SCOPE, disk_bytes=1 << 30, **kw):
    config = EngineConfig(block_size=BLOCK, num_blocks=64, max_num_batched_tokens=64,
                          kv_cache_dir=str(cache_dir), kv_disk_bytes=disk_bytes, **kw)
    return LLMEngine(model, config, context_window=4096, scope=scope)


def run(engine, prompt, eos, rid="r"):
    engine.add_request(GenerationRequest(rid, prompt, MAX_NEW, stop_token_ids=eos))
    tokens, cached = [], None
    while engine.has_work:
        for _, event in engine.step():
            if event.cached_prompt_tokens is not None and cached is None:
                cached = event.cached_prompt_tokens
            if event.token_id is not None:
                tokens.append(event.token_id)
    assert engine.blocks.leaked_blocks() == []
    return tokens, cached


def block_files(engine):
    return sorted(engine.disk.dir.glob("*.safetensors"))


def test_blocks_survive_a_restart(tiny, tmp_path):
    model, eos, expected = tiny
    a = make_engine(model, tmp_path)
    tokens, cached = run(a, PROMPT, eos)
    assert tokens == expected and cached == 0
    a.close()  # flushes the writer
    assert len(block_files(a)) == len(PROMPT) // BLOCK

    b = make_engine(model, tmp_path)  # a fresh pool: nothing in memory
    tokens, cached = run(b, PROMPT, eos)
    assert tokens == expected
    assert cached == (len(PROMPT) // BLOCK) * BLOCK
    stats = b.blocks.stats()["disk"]
    assert stats["hit_blocks"] == len(PROMPT) // BLOCK and stats["rejected_files"] == 0
    # A prompt sharing only the first blocks loads just those.
    other = PROMPT[:40] + [7] * 30
    c = make_engine(model, tmp_path)
    tokens, cached = run(c, other, eos, "o")
    assert cached == 32
    assert tokens == greedy_reference(model, other, MAX_NEW, eos)
    # Two blocks now in memory, the other seven continue from disk.
    tokens, cached = run(c, PROMPT, eos, "p")
    assert tokens == expected and cached == 9 * BLOCK
    assert c.blocks.stats()["disk"]["hit_blocks"] == 9
    b.close()
    c.close()


def test_quantized_pool_round_trips(tmp_path_factory, tmp_path):
    spec = TinyModelSpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, seed=5)
    model, tokenizer = load(str(build_model(tmp_path_factory.mktemp("q") / "m", spec)))
    eos = frozenset(tokenizer.eos_token_ids)
    a = make_engine(model, tmp_path, kv_bits=8)
    first, _ = run(a, PROMPT, eos)
    a.close()
    b = make_engine(model, tmp_path, kv_bits=8)
    again, cached = run(b, PROMPT, eos)
    assert cached == (len(PROMPT) // BLOCK) * BLOCK
    assert again == first  # the stored quantized rows are exactly the computed ones
    # A float pool of the same model is another identity: nothing is shared.
    c = make_engine(model, tmp_path)
    _, cached = run(c, PROMPT, eos)
    assert cached == 0
    for e in (b, c):
        e.close()


def _corrupt(files, foreign_file):
    # flip bytes in the tensor data of one, truncate another, break a header, and replace
    # one with a file written by another model identity under this block's name.
    data = bytearray(files[1].read_bytes())
    data[-10] ^= 0xFF
    files[1].write_bytes(bytes(data))
    files[3].write_bytes(files[3].read_bytes()[:200])
    data = bytearray(files[5].read_bytes())
    data[8:20] = b"#" * 12
    files[5].write_bytes(bytes(data))
    files[7].write_bytes(foreign_file.read_bytes())


def test_corrupt_and_foreign_files_are_dropped(tiny, tmp_path):
    model, eos, expected = tiny
    foreign = make_engine(model, tmp_path / "other", scope=b"another-model")
    run(foreign, PROMPT, eos)
    foreign.close()
    a = make_engine(model, tmp_path)
    run(a, PROMPT, eos)
    a.close()
    files = block_files(a)
    assert len(files) == 9
    _corrupt(files, block_files(foreign)[0])

    # Every damaged file is met along the chain in turn: each restart loads up to the next
    # bad one, drops it, computes the rest, and the output never changes.
    seen_rejected = 0
    for _ in range(5):
        b = make_engine(model, tmp_path)
        tokens, cached = run(b, PROMPT, eos)
        assert tokens == expected
        seen_rejected += b.blocks.stats()["disk"]["rejected_files"]
        b.close()
    assert seen_rejected == 4
    b = make_engine(model, tmp_path)
    tokens, cached = run(b, PROMPT, eos)  # all rewritten by now
    assert tokens == expected and cached == 9 * BLOCK
    for f in block_files(b):
        header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
        meta = json.loads(f.read_bytes()[8 : 8 + header_len])["__metadata__"]
        assert meta["identity"] == b.disk.identity
    b.close()


def test_leftover_temp_files_are_removed(tiny, tmp_path):
    model, eos, _ = tiny
    a = make_engine(model, tmp_path)
    (a.disk.dir / ".deadbeef.safetensors.1.tmp").write_bytes(b"half")
    a.close()
    b = make_engine(model, tmp_path)
    assert not list(b.disk.dir.glob("*.tmp"))
    b.close()


def test_lru_cap_evicts_least_recently_used(tiny, tmp_path):
    model, eos, _ = tiny
    a = make_engine(model, tmp_path)
    run(a, PROMPT, eos)
    a.close()
    per_file = block_files(a)[0].stat().st_size
    # Room for 4 blocks: a second prompt evicts the oldest files.
    b = make_engine(model, tmp_path, disk_bytes=per_file * 4)
    assert b.disk.num_blocks == 4  # over the cap at startup: trimmed
    second = [random.Random(12).randrange(5, 500) for _ in range(70)]  # 4 full blocks
    run(b, second, eos, "s")
    b.disk.flush()
    stats = b.disk.stats()
    assert stats["blocks"] == 4 and stats["bytes"] <= per_file * 4
    assert len(block_files(b)) == 4
    b.close()
    # The survivors are the second prompt's blocks: it is served entirely from disk.
    c = make_engine(model, tmp_path, disk_bytes=per_file * 4)
    _, cached = run(c, second, eos, "s2")
    assert cached == 4 * BLOCK
    c.close()


@pytest.mark.parametrize("seed", [5, 6])
def test_small_pool_reloads_evicted_prefixes_from_disk(tiny, tmp_path, seed):
    """A pool too small to keep the prefixes: concurrent requests keep evicting each other's
    blocks, which come back from disk, and every output is still mlx-lm's own."""
    model, eos, _ = tiny
    rng = random.Random(seed)
    bases = [[rng.randrange(5, 500) for _ in range(60)] for _ in range(5)]
    config = EngineConfig(block_size=8, num_blocks=16, max_num_batched_tokens=32,
                          kv_cache_dir=str(tmp_path), kv_disk_bytes=1 << 30)
    engine = LLMEngine(model, config, context_window=4096, scope=SCOPE)
    references = {}
    for round_ in range(4):
        prompts = {}
        for i in range(4):
            base = bases[rng.randrange(5)]
            prompts[f"{round_}-{i}"] = base[: rng.randrange(20, 60)] + [rng.randrange(5, 500) for _ in range(5)]
            engine.add_request(GenerationRequest(f"{round_}-{i}", prompts[f"{round_}-{i}"], MAX_NEW, stop_token_ids=eos))
        outputs = {rid: [] for rid in prompts}
        while engine.has_work:
            for rid, event in engine.step():
                if event.token_id is not None:
                    outputs[rid].append(event.token_id)
        for rid, prompt in prompts.items():
            key = tuple(prompt)
            if key not in references:
                references[key] = greedy_reference(model, prompt, MAX_NEW, eos)
            assert outputs[rid] == references[key], rid
        assert engine.blocks.leaked_blocks() == []
        engine.disk.flush()
    stats = engine.blocks.stats()["disk"]
    assert stats["hit_blocks"] > 0 and stats["rejected_files"] == 0
    engine.close()


def test_disk_tier_off_by_default(tiny):
    model, eos, _ = tiny
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=64), context_window=4096)
    assert engine.disk is None and "disk" not in engine.blocks.stats()


def test_writer_keeps_up_without_blocking(tiny, tmp_path):
    """publish only snapshots; files appear after flush, and repeated publication of the
    same hash writes once."""
    model, eos, _ = tiny
    a = make_engine(model, tmp_path)
    run(a, PROMPT, eos)
    run(a, PROMPT, eos, "again")  # all in memory: nothing new to write
    a.disk.flush()
    assert a.disk.stats()["written_blocks"] == 9
    a.close()
    assert isinstance(a.disk, DiskKVCache)


def test_server_restart_serves_a_long_prompt_from_disk(model_dir, tmp_path):
    from omlx_process import call, omlx_server

    prompt = [random.Random(13).randrange(5, 500) for _ in range(200)]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    outputs = []
    for round_ in range(2):
        with omlx_server(model_dir, tmp_path, "--kv-cache-gb", "0.05", failure=pytest.fail) as server:
            status, reply = call(server, "POST", "/v1/completions", body)
            assert status == 200, reply
            outputs.append(reply["choices"][0]["text"])
            cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            disk = server.health()["models_loaded"]["tiny"]["kv_cache"]["disk"]
            if round_ == 0:
                assert cached == 0
            else:  # a fresh process: these blocks can only have come from disk
                assert cached == (len(prompt) - 1) // 16 * 16
                assert disk["hit_blocks"] == cached // 16
            assert disk["dir"].startswith(str(tmp_path / "home" / "cache"))
    assert outputs[0] == outputs[1]
    assert len(list((tmp_path / "home" / "cache").glob("*/*.safetensors"))) == len(prompt) // 16


@pytest.mark.parametrize("dtype,bits", [("bfloat16", None), ("float16", 4)])
def test_block_rows_round_trip_bit_exact(tmp_path, dtype, bits):
    """bfloat16 (no numpy dtype) and quantized parts come back bit for bit, into any block."""
    import mlx.core as mx

    from omlx.scheduler.kv_cache import KVLayout, PagedKVStorage

    layout = KVLayout(num_layers=2, num_kv_heads=2, key_dim=64, value_dim=64, dtype=getattr(mx, dtype))
    storage = PagedKVStorage(layout, num_blocks=6, block_size=4, kv_bits=bits, group_size=64)
    rows = mx.arange(2 * 2 * 4, 3 * 2 * 4)  # block 2
    for layer in range(2):
        k = mx.random.normal((1, 2, 4, 64)).astype(layout.dtype)
        storage.write(layer, k, -k, rows)
    mx.eval(storage.arrays())
    disk = DiskKVCache(tmp_path, b"bits", storage, 1 << 20)
    h = bytes(range(16))
    disk.publish(h, 2)
    disk.flush()
    assert h in disk
    assert disk.load(h, 4)
    rows_per_block = 2 * 4
    for arr in storage.arrays():
        assert mx.array_equal(arr[2 * rows_per_block : 3 * rows_per_block], arr[4 * rows_per_block : 5 * rows_per_block])
    disk.close()


def test_cli_and_env_options(tmp_path, monkeypatch):
    from omlx.cli import build_parser, resolve_options

    monkeypatch.setenv("OMLX_HOME", str(tmp_path))
    monkeypatch.setenv("OMLX_KV_CACHE_DIR", str(tmp_path / "kv"))
    options = resolve_options(build_parser().parse_args(["serve", "--kv-disk-gb", "2"]))
    assert options["kv_cache_dir"] == str(tmp_path / "kv") and options["kv_disk_gb"] == 2 and options["kv_disk"]
    options = resolve_options(build_parser().parse_args(["serve", "--no-kv-disk"]))
    assert options["kv_disk"] is False
