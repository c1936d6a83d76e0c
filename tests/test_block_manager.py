"""Block allocation, ref counts, hash-chained prefix reuse and LRU eviction."""

from hypothesis import given, settings
from hypothesis import strategies as st

from omlx.scheduler.block_manager import BlockManager
from omlx.scheduler.request import GenerationRequest
from omlx.scheduler.sequence import Sequence


def make_seq(tokens, rid="r"):
    return Sequence(GenerationRequest(rid, list(tokens), max_tokens=8))


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the whole prompt was computed, as the scheduler would after prefill."""
    assert bm.allocate(seq, seq.num_pending_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_shared_prefix_reuses_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(10), "a")
    bm.match_prefix(a)
    run_prefill(bm, a)
    assert len(a.block_table) == 3
    b = make_seq(list(range(8)) + [99, 98, 97], "b")
    assert bm.match_prefix(b) == 8  # two full blocks shared
    assert b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    run_prefill(bm, b)
    assert b.block_table[2] != a.block_table[2]
    bm.free(a)
    bm.free(b)
    assert bm.leaked_blocks() == []
    assert bm.num_free_blocks == bm.usable_blocks


def test_identical_prompt_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(8), "a")
    bm.match_prefix(a)
    run_prefill(bm, a)
    bm.free(a)
    b = make_seq(range(8), "b")
    # Both blocks are cached, but the model must still see the last prompt token.
    assert bm.match_prefix(b) == 4
    assert b.num_pending_tokens == 4


def test_freed_prefix_survives_until_space_is_needed_then_lru_goes_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    old = make_seq([1, 2, 3, 4, 5], "old")
    bm.match_prefix(old)
    run_prefill(bm, old)
    bm.free(old)
    new = make_seq([7, 8, 9], "new")
    bm.match_prefix(new)
    run_prefill(bm, new)
    bm.free(new)
    assert bm.num_cached_blocks == 3  # [1,2] [3,4] [7,8]
    # Needing 2 blocks: the never-cached partial blocks go first, then the least recent prefix.
    big = make_seq([20, 21, 22, 23, 24, 25, 26], "big")
    bm.match_prefix(big)
    assert bm.allocate(big, 7)
    probe = make_seq([7, 8, 9], "probe")
    assert bm.match_prefix(probe) == 0  # [7,8] was evicted (its tail went first)
    bm.free(probe)
    bm.free(big)
    assert bm.leaked_blocks() == []


def test_allocation_fails_cleanly_when_pool_is_full():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(range(9), "a")
    bm.match_prefix(a)
    assert not bm.allocate(a, 9)  # needs 3 blocks, 2 usable
    assert a.block_table == []
    assert bm.allocate(a, 8)
    assert bm.num_free_blocks == 0
    bm.free(a)
    assert bm.num_free_blocks == 2


def test_prefix_hashes_are_model_scoped():
    a, b = BlockManager(8, 4, scope=b"model-a"), BlockManager(8, 4, scope=b"model-b")
    sa, sb = make_seq(range(9), "a"), make_seq(range(9), "b")
    for bm, s in ((a, sa), (b, sb)):
        bm.match_prefix(s)
        run_prefill(bm, s)
    assert sa.block_hashes and sa.block_hashes[0] != sb.block_hashes[0]


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=20), min_size=1, max_size=12),
    num_blocks=st.integers(4, 24),
)
def test_random_workload_never_leaks_and_shares_only_equal_prefixes(prompts, num_blocks):
    bm = BlockManager(num_blocks=num_blocks, block_size=3)
    live = []
    for i, tokens in enumerate(prompts):
        seq = make_seq(tokens, str(i))
        hit = bm.match_prefix(seq)
        if not bm.allocate(seq, seq.num_pending_tokens):
            bm.free(seq)
            continue
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_full_blocks(seq)
        live.append(seq)
        # A shared block always holds the same tokens in every sequence that maps it.
        for other in live:
            for j, block in enumerate(other.block_table[: other.num_tokens // 3]):
                if block in seq.block_table[: seq.num_tokens // 3]:
                    k = seq.block_table.index(block)
                    assert other.token_ids[j * 3 : j * 3 + 3] == seq.token_ids[k * 3 : k * 3 + 3]
        assert hit % 3 == 0 and hit < seq.num_tokens
        if i % 3 == 2:
            bm.free(live.pop(0))
    for seq in live:
        bm.free(seq)
    assert bm.leaked_blocks() == []
    assert bm.num_free_blocks == bm.usable_blocks


def test_prefix_cache_off_reuses_nothing():
    bm = BlockManager(num_blocks=16, block_size=4, prefix_cache=False)
    a = make_seq(range(10), "a")
    bm.match_prefix(a)
    run_prefill(bm, a)
    bm.free(a)
    b = make_seq(range(10), "b")
    assert bm.match_prefix(b) == 0
    assert b.num_pending_tokens == 10
