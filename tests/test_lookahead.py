"""Overlapped decode steps (omlx.scheduler.lookahead): a step built on the previous step's
unread tokens gives the same tokens as the engine without overlap, whatever ends, arrives or
is aborted meanwhile, and every KV block comes back."""

import pytest
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.tiny_models import TinyModelSpec, build_model

pytestmark = pytest.mark.usefixtures("attention_kernel")

PROMPTS = [[5 + (7 * i + 3 * j) % 400 for j in range(9 + 5 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("lookahead") / "m", TinyModelSpec(model_type="llama", seed=5))
    return load(str(path))[0]


def make_engine(model, overlap: bool, speculative: bool = False, num_blocks: int = 64, max_num_seqs: int = 8) -> LLMEngine:
    config = EngineConfig(block_size=8, num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                          speculative=speculative, overlap_steps=overlap, prefix_cache=True)
    return LLMEngine(model, config, context_window=4096)


def run(engine: LLMEngine, requests: list[GenerationRequest], arrivals: dict[int, list[GenerationRequest]] | None = None,
        abort_at: dict[int, str] | None = None) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Step the engine to the end: `arrivals[k]` are added and `abort_at[k]` aborted before step k."""
    for request in requests:
        engine.add_request(request)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    step = 0
    while engine.has_work or (arrivals and any(k >= step for k in arrivals)):
        for request in (arrivals or {}).get(step, []):
            engine.add_request(request)
        if abort_at and step in abort_at:
            engine.abort(abort_at[step])
            reasons[abort_at[step]] = "abort"
        for request_id, event in engine.step():
            if event.token_id is not None:
                tokens.setdefault(request_id, []).append(event.token_id)
            if event.finish_reason is not None:
                reasons[request_id] = event.finish_reason.value
        step += 1
    return tokens, reasons


def requests(max_tokens=(30, 17, 24, 9), **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", list(p), max_tokens=m, sampling=SamplingParams(**sampling))
            for i, (p, m) in enumerate(zip(PROMPTS, max_tokens))]


def assert_blocks_back(engine: LLMEngine) -> None:
    assert engine.lookahead is None or engine.lookahead.inflight is None or not any(
        s.status.name == "RUNNING" for s in engine.lookahead.inflight.seqs)
    blocks = engine.blocks
    assert blocks.num_free_blocks == blocks.max_usable_blocks


def test_greedy_tokens_equal_without_overlap(model):
    plain, overlapped = make_engine(model, False), make_engine(model, True)
    expected, _ = run(plain, requests())
    got, reasons = run(overlapped, requests())
    assert got == expected
    assert overlapped.lookahead.steps_ahead > 20  # the decodes did overlap
    # /v1/models/status shows it (serving.overlap_steps); off, it says so.
    assert overlapped.serving_info()["overlap_steps"]["steps_ahead"] == overlapped.lookahead.steps_ahead
    assert plain.serving_info()["overlap_steps"] is None
    assert set(reasons.values()) == {"length"}
    assert_blocks_back(overlapped)


def test_seeded_sampling_replays_with_overlap(model):
    sampling = dict(temperature=0.9, top_p=0.95, seed=11)
    expected, _ = run(make_engine(model, False), requests(**sampling))
    engine = make_engine(model, True)
    got, _ = run(engine, requests(**sampling))
    assert got == expected and engine.lookahead.steps_ahead > 0


def test_greedy_and_sampled_rows_in_one_step(model):
    def mixed():
        reqs = requests()
        for request in reqs[1::2]:
            request.sampling = SamplingParams(temperature=0.8, seed=5)
        return reqs

    expected, _ = run(make_engine(model, False), mixed())
    engine = make_engine(model, True)
    got, _ = run(engine, mixed())
    assert got == expected and engine.lookahead.steps_ahead > 0


def test_stop_token_mid_pipeline_drops_the_row_ahead(model):
    reference, _ = run(make_engine(model, False), requests())
    # Each request stops at a token it produces mid-stream: the step built ahead of it is dropped.
    stops = {f"r{i}": reference[f"r{i}"][5 + i] for i in range(4)}
    reqs = requests()
    for request in reqs:
        request.stop_token_ids = frozenset({stops[request.request_id]}) | frozenset(request.stop_token_ids or ())
    expected, expected_reasons = run(make_engine(model, False), [r for r in reqs])
    reqs = requests()
    for request in reqs:
        request.stop_token_ids = frozenset({stops[request.request_id]}) | frozenset(request.stop_token_ids or ())
    engine = make_engine(model, True)
    got, reasons = run(engine, reqs)
    assert got == expected and reasons == expected_reasons
    assert "stop" in reasons.values()
    assert engine.lookahead.rows_dropped > 0
    assert_blocks_back(engine)


def test_arrivals_and_aborts_while_pipelined(model):
    def scenario(overlap):
        first = requests()[:2]
        later = requests()[2:]
        engine = make_engine(model, overlap)
        out = run(engine, first, arrivals={6: [later[0]], 11: [later[1]]}, abort_at={9: "r1"})
        return engine, out

    plain, (expected, expected_reasons) = scenario(False)
    engine, (got, reasons) = scenario(True)
    assert got == expected and reasons == expected_reasons
    assert engine.lookahead.steps_ahead > 0
    assert_blocks_back(engine)


def test_speculation_still_drafts_between_pipelined_steps(model):
    # A prompt that repeats itself: prompt lookup finds drafts, and the pipeline makes room.
    loop = [11, 12, 13, 14, 15, 16] * 6
    reqs = lambda: [GenerationRequest("s", list(loop), max_tokens=40)]  # noqa: E731
    expected, _ = run(make_engine(model, False, speculative=True), reqs())
    engine = make_engine(model, True, speculative=True)
    got, _ = run(engine, reqs())
    assert got == expected
    assert engine.scheduler.speculator.drafted_tokens > 0
    assert_blocks_back(engine)


def overlapped_like_plain(model, **sizes) -> LLMEngine:
    """Run `requests()` without and with overlap on engines of these sizes: the same tokens,
    every block back.  Returns the overlapped engine."""
    expected, _ = run(make_engine(model, False, **sizes), requests())
    engine = make_engine(model, True, **sizes)
    got, _ = run(engine, requests())
    assert got == expected
    assert_blocks_back(engine)
    return engine


def test_no_step_ahead_without_a_free_block(model):
    # A pool just large enough: the step ahead never preempts; tokens are unchanged.
    overlapped_like_plain(model, num_blocks=12)


def test_a_full_batch_keeps_overlapping_while_requests_queue(model):
    # Two slots, four requests: the queued ones wait for a slot, and the two running ones
    # keep overlapping meanwhile (a waiting request that cannot be admitted stops nothing).
    assert overlapped_like_plain(model, max_num_seqs=2).lookahead.steps_ahead > 30
