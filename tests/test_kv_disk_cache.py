"""The prefix cache's disk tier: blocks written behind the engine outlive it, load back into
a fresh engine (a restart) as cached tokens, never change outputs, and bad files are dropped."""

import json
import random
import struct

import pytest
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.block_manager import hash_block
from omlx.scheduler.disk import DiskKVCache
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


def make_engine(model, cache_dir, scope=SCOPE, disk_bytes=1 << 30, label=None, **kw):
    config = EngineConfig(block_size=BLOCK, num_blocks=64, max_num_batched_tokens=64,
                          kv_cache_dir=str(cache_dir), kv_disk_bytes=disk_bytes, **kw)
    return LLMEngine(model, config, context_window=4096, scope=scope, label=label)


def run(engine, prompt, eos, rid="r"):
    engine.add_request(GenerationRequest(rid, prompt, MAX_NEW, stop_token_ids=eos))
    tokens, cached = drain(engine)
    assert engine.blocks.leaked_blocks() == []
    return tokens, cached


def drain(engine):
    """Step until idle: the tokens generated, and the first cached-prompt-tokens report."""
    tokens, cached = [], None
    while engine.has_work:
        for _, event in engine.step():
            if event.cached_prompt_tokens is not None and cached is None:
                cached = event.cached_prompt_tokens
            if event.token_id is not None:
                tokens.append(event.token_id)
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
@pytest.mark.slow
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
            assert disk["label"].startswith("tiny (") and disk["removed_dirs"] == 0
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


# ---------------------------------------------------------------------- identity directories


def test_identity_metadata_is_written_and_kept(tiny, tmp_path):
    model, eos, _ = tiny
    a = make_engine(model, tmp_path, label="tiny")
    meta = json.loads((a.disk.dir / "identity.json").read_text())
    a.close()
    assert meta["identity"] == a.disk.identity == a.disk.dir.name
    assert meta["label"] == "tiny" and meta["scope"] == SCOPE.decode()
    assert meta["layout"]["block_size"] == BLOCK and meta["layout"]["kv_bits"] is None
    b = make_engine(model, tmp_path, label="tiny")  # the same identity: reopened, not removed
    again = json.loads((b.disk.dir / "identity.json").read_text())
    assert b.disk.dir == a.disk.dir and again["created"] == meta["created"]
    assert again["last_used"] >= meta["last_used"] and b.disk.stats()["removed_dirs"] == 0
    b.close()
    # Without a label, a readable scope is the label.
    c = make_engine(model, tmp_path)
    assert c.disk.label == SCOPE.decode()
    c.close()


def test_changed_weights_remove_the_old_identity_dir(tiny, tmp_path):
    import os
    import time

    model, eos, expected = tiny
    old = make_engine(model, tmp_path, scope=b"tiny:weights-v1", label="tiny")
    run(old, PROMPT, eos)
    old.close()
    other = make_engine(model, tmp_path, scope=b"other:weights", label="other")
    run(other, PROMPT, eos)
    other.close()
    old_bytes = sum(f.stat().st_size for f in old.disk.dir.iterdir())
    assert len(block_files(old)) == 9
    # Not ours: a plain folder, an identity-named one with a foreign file in it, and a
    # metadata-less identity dir (an older version's) still in recent use.
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "x.safetensors").write_bytes(b"keep")
    foreign = tmp_path / ("ab" * 12)
    foreign.mkdir()
    (foreign / "readme.txt").write_text("keep")
    recent = tmp_path / ("cd" * 12)
    recent.mkdir()
    (recent / (("0" * 32) + ".safetensors")).write_bytes(b"recent")
    # ... and a metadata-less identity dir untouched for 60 days: garbage.
    stale = tmp_path / ("ef" * 12)
    stale.mkdir()
    stale_file = stale / (("1" * 32) + ".safetensors")
    stale_file.write_bytes(b"x" * 100)
    long_ago = time.time() - 60 * 86400
    os.utime(stale_file, (long_ago, long_ago))
    os.utime(stale, (long_ago, long_ago))

    new = make_engine(model, tmp_path, scope=b"tiny:weights-v2", label="tiny")  # weights changed
    stats = new.disk.stats()
    assert not old.disk.dir.exists() and not stale.exists()
    assert stats["removed_dirs"] == 2 and stats["removed_bytes"] == old_bytes + 100
    assert len(block_files(other)) == 9 and (other.disk.dir / "identity.json").exists()
    assert (unrelated / "x.safetensors").exists() and (foreign / "readme.txt").exists()
    assert (recent / (("0" * 32) + ".safetensors")).exists()
    tokens, cached = run(new, PROMPT, eos)  # nothing stale is ever read
    assert tokens == expected and cached == 0
    new.close()


def test_a_directory_in_use_is_never_removed(tiny, tmp_path):
    model, eos, _ = tiny
    a = make_engine(model, tmp_path, scope=b"tiny:v1", label="tiny")
    run(a, PROMPT, eos)
    a.disk.flush()
    b = make_engine(model, tmp_path, scope=b"tiny:v2", label="tiny")
    assert a.disk.dir.exists() and len(block_files(a)) == 9  # a still holds it
    assert b.disk.stats()["removed_dirs"] == 0
    a.close()
    c = make_engine(model, tmp_path, scope=b"tiny:v3", label="tiny")
    assert not a.disk.dir.exists() and b.disk.dir.exists()  # b is still open
    assert c.disk.stats()["removed_dirs"] == 1
    b.close()
    c.close()


# ---------------------------------------------------------------------- read-ahead


def chain(engine, prompt):
    parent, out = engine.blocks.scope, []
    for i in range(len(prompt) // BLOCK):
        parent = hash_block(parent, prompt[i * BLOCK : (i + 1) * BLOCK])
        out.append(parent)
    return out


def stored(model, tmp_path, eos):
    a = make_engine(model, tmp_path)
    run(a, PROMPT, eos)
    a.close()


def block_rows(engine, blocks):
    import numpy as np

    rows = engine.disk.rows_per_block
    return [np.array(arr[b * rows : (b + 1) * rows]) for b in blocks for arr in engine.storage.arrays()]


def test_prefetched_blocks_match_the_synchronous_path(tiny, tmp_path):
    import numpy as np

    model, eos, expected = tiny
    stored(model, tmp_path, eos)
    tables = {}
    for prefetch in (True, False):
        e = make_engine(model, tmp_path)
        e.disk.prefetch_enabled = prefetch
        e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
        e.disk.wait_prefetch()
        stats = e.disk.stats()
        assert stats["staged_blocks"] == (9 if prefetch else 0)
        assert (stats["staged_bytes"] > 0) == prefetch
        e.scheduler.schedule()  # admission: loads the prefix (staged or read now)
        seq = e.sequences["r"]
        assert seq.num_computed_tokens == 9 * BLOCK
        tables[prefetch] = block_rows(e, seq.block_table)
        e.abort("r")
        stats = e.disk.stats()
        assert stats["hit_blocks"] == 9 and stats["prefetched_blocks"] == (9 if prefetch else 0)
        assert stats["staged_blocks"] == 0 and stats["staged_bytes"] == 0
        tokens, cached = run(e, PROMPT, eos, "again")  # from memory now
        assert tokens == expected and cached == 9 * BLOCK
        e.close()
    assert all(np.array_equal(x, y) for x, y in zip(tables[True], tables[False], strict=True))

    # And a whole run from staged blocks gives the computed run's tokens.
    e = make_engine(model, tmp_path)
    e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
    e.disk.wait_prefetch()
    tokens, cached = drain(e)
    assert tokens == expected and cached == 9 * BLOCK
    assert e.disk.stats()["prefetched_blocks"] == 9 and e.disk.stats()["prefetch_read_blocks"] == 9
    e.close()


def test_prefetch_rejects_a_corrupt_file_like_a_load(tiny, tmp_path):
    model, eos, expected = tiny
    stored(model, tmp_path, eos)
    e = make_engine(model, tmp_path)
    hashes = chain(e, PROMPT)
    path = e.disk.path(hashes[4])
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit of tensor data
    path.write_bytes(bytes(data))
    e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
    e.disk.wait_prefetch()
    stats = e.disk.stats()
    # Staged up to the bad file, which is gone and counted once; the chain stops there.
    assert stats["staged_blocks"] == 4 and stats["rejected_files"] == 1 and not path.exists()
    assert hashes[4] not in e.disk
    tokens, cached = drain(e)
    assert tokens == expected and cached == 4 * BLOCK
    stats = e.disk.stats()
    assert stats["prefetched_blocks"] == 4 and stats["hit_blocks"] == 4 and stats["rejected_files"] == 1
    assert stats["staged_blocks"] == 0 and e.blocks.leaked_blocks() == []
    e.close()


def test_staged_memory_is_bounded_and_released(tiny, tmp_path):
    model, eos, expected = tiny
    stored(model, tmp_path, eos)
    e = make_engine(model, tmp_path)
    # A cap of three blocks: the rest are read at admission as before.
    e.disk.read_ahead.staging_bytes = e.disk.stats()["bytes"] // 9 * 3
    e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
    e.disk.wait_prefetch()
    per_block = e.disk.stats()["staged_bytes"] // 3
    assert e.disk.stats()["staged_blocks"] == 3
    # Aborted before admission: its staged blocks go at once.
    e.abort("r")
    assert e.disk.stats()["staged_blocks"] == 0 and e.disk.stats()["staged_bytes"] == 0
    e.disk.read_ahead.staging_bytes = 1 << 30
    # Three requests sharing the prefix, one with another tail: staged once, shared; the
    # first admitted takes them, the others find the blocks in memory.
    other = PROMPT[:100] + [9] * 20
    prompts = {"a": PROMPT, "b": PROMPT, "c": other}
    for rid, prompt in prompts.items():
        e.add_request(GenerationRequest(rid, prompt, MAX_NEW, stop_token_ids=eos))
    e.disk.wait_prefetch()
    assert e.disk.stats()["staged_blocks"] == 9
    assert e.disk.stats()["staged_bytes"] == 9 * per_block
    outputs = {rid: [] for rid in prompts}
    while e.has_work:
        for rid, event in e.step():
            if event.token_id is not None:
                outputs[rid].append(event.token_id)
    assert outputs["a"] == outputs["b"] == expected
    assert outputs["c"] == greedy_reference(model, other, MAX_NEW, eos)
    stats = e.disk.stats()
    assert stats["prefetched_blocks"] == 9 and stats["staged_blocks"] == 0 and stats["staged_bytes"] == 0
    assert not e.disk.read_ahead._owners and not e.disk.read_ahead._reading_for and e.blocks.leaked_blocks() == []
    e.close()


def test_admission_waits_for_the_read_ahead_while_others_run(tiny, tmp_path):
    """A request whose prefix is still being read ahead is admitted only once it is staged,
    while running sequences go on decoding; both outputs are mlx-lm's own."""
    import threading

    model, eos, expected = tiny
    stored(model, tmp_path, eos)
    e = make_engine(model, tmp_path)
    gate = threading.Event()
    read_ahead = e.disk.read_ahead._read_ahead

    def held(owner, hashes):
        gate.wait(30)
        read_ahead(owner, hashes)

    e.disk.read_ahead._read_ahead = held
    first = [random.Random(21).randrange(5, 500) for _ in range(20)]
    e.add_request(GenerationRequest("first", first, 40, stop_token_ids=frozenset()))
    outputs = {"first": [], "r": []}
    cached = {}

    def step():
        for rid, event in e.step():
            if event.cached_prompt_tokens is not None:
                cached.setdefault(rid, event.cached_prompt_tokens)
            if event.token_id is not None:
                outputs[rid].append(event.token_id)

    step()
    e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
    for _ in range(4):
        step()  # "first" decodes; "r" waits for its read-ahead
    assert len(outputs["first"]) == 5 and not outputs["r"]
    assert e.sequences["r"] in e.scheduler.waiting
    gate.set()
    e.disk.wait_prefetch()
    while e.has_work:
        step()
    assert outputs["r"] == expected and cached["r"] == 9 * BLOCK
    assert outputs["first"] == greedy_reference(model, first, 40, frozenset())
    stats = e.disk.stats()
    assert stats["prefetched_blocks"] == 9 and stats["staged_blocks"] == 0
    e.close()


def test_unclaimed_staged_blocks_expire(tiny, tmp_path, monkeypatch):
    from omlx.scheduler.disk import read_ahead

    model, eos, expected = tiny
    stored(model, tmp_path, eos)
    e = make_engine(model, tmp_path)
    e.add_request(GenerationRequest("r", PROMPT, MAX_NEW, stop_token_ids=eos))
    e.disk.wait_prefetch()
    assert e.disk.stats()["staged_blocks"] == 9
    monkeypatch.setattr(read_ahead, "STAGING_TTL_S", 0.0)
    e.disk.prefetch([bytes(16)], "late")  # any later read-ahead expires what waited too long
    e.disk.wait_prefetch()
    stats = e.disk.stats()
    assert stats["staged_blocks"] == 0 and stats["staged_bytes"] == 0 and stats["prefetch_dropped_blocks"] == 9
    e.disk.release("late")
    tokens, cached = drain(e)
    assert tokens == expected and cached == 9 * BLOCK  # read at admission instead
    assert e.disk.stats()["prefetched_blocks"] == 0 and e.disk.stats()["hit_blocks"] == 9
    e.close()


def test_a_moved_model_keeps_its_disk_cache_and_new_weights_never_hit(tmp_path):
    """The disk tier's identity is the model's content: the same folder moved and renamed
    finds its blocks; the same path with rewritten weights (same size, same mtime) does not."""
    import os
    import shutil

    from omlx_process import call, omlx_server
    from omlx.testing.tiny_models import TinyModelSpec, build_model

    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    build_model(first_dir / "alpha", TinyModelSpec(seed=21))
    prompt = [random.Random(5).randrange(5, 500) for _ in range(120)]
    full_blocks = (len(prompt) - 1) // 16 * 16

    def cached_tokens(model_dir, model_id):
        with omlx_server(model_dir, tmp_path, failure=pytest.fail) as server:
            status, reply = call(server, "POST", "/v1/completions",
                                 {"model": model_id, "prompt": prompt, "max_tokens": 2, "temperature": 0})
            assert status == 200, reply
            return reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached_tokens(first_dir, "alpha") == 0
    shutil.move(first_dir / "alpha", second_dir / "renamed")
    assert cached_tokens(second_dir, "renamed") == full_blocks  # a new process: from disk

    # Same path, same sizes and mtimes, other weights: never a hit.
    weights = next((second_dir / "renamed").glob("*.safetensors"))
    stat = weights.stat()
    other = tmp_path / "other"
    build_model(other, TinyModelSpec(seed=22))
    shutil.copyfile(next(other.glob("*.safetensors")), weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert cached_tokens(second_dir, "renamed") == 0
