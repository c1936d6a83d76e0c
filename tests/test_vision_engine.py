"""The engine core with vision-language models, without a server: image requests of tiny
Qwen2-VL and LLaVA models mixed with text requests under any arrival order, step budget
(prefill chunks ending inside an image's tokens), pool size (preemption) and prefix-cache
state give the greedy tokens of `mlx_vlm.generate` alone, and leave no block behind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.scheduler.block_manager import BlockManager
from omlx.scheduler.engine import EngineConfig, LLMEngine
from omlx.scheduler.multimodal import ImageSpan, MultimodalInput
from omlx.scheduler.request import GenerationRequest
from omlx.scheduler.sequence import Sequence
from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm
from omlx.vision.encoder import LanguageAdapter, PassInputs
from omlx.vision.images import decode
from omlx.vision.prompt import prepare

# The engine invariants hold with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_TOKENS = 8


def _png(seed: int, size=(80, 100)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


class Family:
    """A tiny VLM loaded with mlx-vlm, its prompts and their reference answers."""

    def __init__(self, path, max_images: int):
        from mlx_vlm import load

        self.model, self.processor = load(str(path))
        config = self.model.config
        self.image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        eos = config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.max_images = max_images
        self._references: dict = {}

    def prompt(self, seeds: tuple[int, ...], words: int):
        """(ids, multimodal, reference tokens) of a user turn with these images."""
        text = "describe the picture" + " and the cat" * words
        content = [{"type": "image"} for _ in seeds] + [{"type": "text", "text": text}]
        template = self.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content if seeds else text}], add_generation_prompt=True, tokenize=False)
        images = [decode(_png(s), "image") for s in seeds]
        ids, multimodal = prepare(self.processor, self.image_token, template, images)
        key = (seeds, words)
        if key not in self._references:
            self._references[key] = self._reference(template, images)
        return ids, multimodal, self._references[key]

    def _reference(self, prompt: str, images) -> list[int]:
        from mlx_vlm import generate

        if images:
            inputs = self.processor(text=[prompt], images=[i.image for i in images])
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
            result = generate(self.model, self.processor, prompt, input_ids=inputs["input_ids"],
                              pixel_values=inputs["pixel_values"], mask=inputs["attention_mask"],
                              max_tokens=MAX_TOKENS, temperature=0.0, verbose=False, **extra)
        else:
            result = generate(self.model, self.processor, prompt, max_tokens=MAX_TOKENS, temperature=0.0, verbose=False)
        tokens = []
        for token in result.token_ids:
            if token in self.eos:
                break
            tokens.append(token)
        return tokens


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-engine")
    return {
        "qwen2_vl": Family(build_vlm(root / "qwen", TinyVLMSpec(family="qwen2_vl")), max_images=2),
        "llava": Family(build_vlm(root / "llava", TinyVLMSpec(family="llava", seed=1)), max_images=1),
    }


def _engine(family: Family, budget: int, num_blocks: int, block_size: int = 8, prefix_cache: bool = True,
            vision_prompts: int = 1):
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                          prefix_cache=prefix_cache, max_vision_prompts_per_step=vision_prompts)
    return LLMEngine(LanguageAdapter(family.model), config, context_window=4096, vision=PassInputs(family.model))


def _run(engine, requests: list[tuple[int, GenerationRequest]]) -> dict[str, list[int]]:
    """Add each request at its step; run until all finish; their tokens."""
    pending = sorted(requests, key=lambda r: r[0])
    out = {r.request_id: [] for _, r in requests}
    step = 0
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        for request_id, event in engine.step():
            assert event.error is None, event.error
            if event.token_id is not None:
                out[request_id].append(event.token_id)
        step += 1
    return out


request_plans = st.lists(
    st.tuples(
        st.integers(0, 4),  # arrival step
        st.integers(0, 2),  # images (capped by the family)
        st.integers(0, 3),  # image seed
        st.integers(0, 3),  # extra words
    ),
    min_size=2, max_size=5,
)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=request_plans, budget=st.integers(5, 64), num_blocks=st.integers(24, 80), repeat=st.booleans(),
       vision_prompts=st.integers(1, 3))
@pytest.mark.slow
def test_mixed_requests_match_mlx_vlm_alone(families, name, plan, budget, num_blocks, repeat, vision_prompts):
    family = families[name]
    engine = _engine(family, budget, num_blocks, vision_prompts=vision_prompts)
    rounds = 2 if repeat else 1  # the second round meets the first one's cached prefixes
    for round_ in range(rounds):
        requests, expected = [], {}
        for k, (arrival, count, seed, words) in enumerate(plan):
            seeds = tuple(seed + i for i in range(min(count, family.max_images)))
            ids, multimodal, reference = family.prompt(seeds, words)
            request_id = f"{round_}-{k}"
            requests.append((arrival, GenerationRequest(request_id, ids, MAX_TOKENS, multimodal=multimodal)))
            expected[request_id] = reference
        got = _run(engine, requests)
        assert got == expected
        assert engine.blocks.leaked_blocks() == []


def test_vision_tower_runs_once_for_prompts_admitted_together(families):
    """Qwen2-VL's tower takes the patches of several images of different sizes at once: the
    prompts admitted in one step (up to --max-vision-prompts-per-step) share one tower call."""
    family = families["qwen2_vl"]
    engine = _engine(family, budget=512, num_blocks=120, vision_prompts=3)
    requests, expected = [], {}
    for k, seeds in enumerate([(0,), (1, 2), (3,)]):
        ids, multimodal, reference = family.prompt(seeds, k)
        requests.append((0, GenerationRequest(f"r{k}", ids, MAX_TOKENS, multimodal=multimodal)))
        expected[f"r{k}"] = reference
    assert _run(engine, requests) == expected
    assert engine.runner.vision.vision_calls == 1
    assert engine.runner.vision.images_encoded == 4


def test_image_prompts_take_the_tower_one_per_step_by_default(families):
    """By default one image prompt's tower runs per step: three arriving together are admitted
    in three consecutive steps, each answering its first token before the next one's tower
    runs (what keeps the others' inter-token latency low); the tokens stay exact."""
    family = families["qwen2_vl"]
    engine = _engine(family, budget=512, num_blocks=120)
    expected = {}
    for k, seeds in enumerate([(0,), (1, 2), (3,)]):
        ids, multimodal, reference = family.prompt(seeds, k)
        engine.add_request(GenerationRequest(f"r{k}", ids, MAX_TOKENS, multimodal=multimodal))
        expected[f"r{k}"] = reference
    got = {rid: [] for rid in expected}
    first_token_step, tower_calls = {}, []
    step = 0
    while engine.has_work:
        for rid, event in engine.step():
            if event.token_id is not None:
                got[rid].append(event.token_id)
                first_token_step.setdefault(rid, step)
        tower_calls.append(engine.runner.vision.vision_calls)
        step += 1
    assert got == expected
    assert first_token_step == {"r0": 0, "r1": 1, "r2": 2}
    assert tower_calls[:3] == [1, 2, 3] and tower_calls[-1] == 3
    assert engine.runner.vision.images_encoded == 4
    assert engine.blocks.leaked_blocks() == []


def test_cached_image_prefix_skips_the_tower(families):
    """A prompt whose blocks through its last image are all cached does not run the tower."""
    family = families["qwen2_vl"]
    engine = _engine(family, budget=512, num_blocks=120)
    ids, multimodal, reference = family.prompt((0,), 3)
    assert _run(engine, [(0, GenerationRequest("a", ids, MAX_TOKENS, multimodal=multimodal))]) == {"a": reference}
    calls = engine.runner.vision.vision_calls
    ids, multimodal, reference = family.prompt((0,), 3)
    assert multimodal.spans[-1].end < len(ids) - 8  # the image ends well before the last block
    assert _run(engine, [(0, GenerationRequest("b", ids, MAX_TOKENS, multimodal=multimodal))]) == {"b": reference}
    assert engine.runner.vision.vision_calls == calls


def _hashes(blocks: BlockManager, ids: list[int], digest: bytes | None, span=(4, 12)) -> list[bytes]:
    multimodal = None if digest is None else MultimodalInput([ImageSpan(*span, digest)])
    seq = Sequence(GenerationRequest("x", ids, 1, multimodal=multimodal))
    seq.num_computed_tokens = len(ids)
    seq.block_table = list(range(1, 1 + len(ids) // blocks.block_size))
    blocks.cache_full_blocks(seq)
    return seq.block_hashes


def test_block_hashes_chain_on_image_content():
    blocks = BlockManager(num_blocks=64, block_size=4)
    ids = list(range(100, 120))
    text = _hashes(blocks, ids, None)
    first = _hashes(BlockManager(64, 4), ids, b"image-a")
    same = _hashes(BlockManager(64, 4), ids, b"image-a")
    other = _hashes(BlockManager(64, 4), ids, b"image-b")
    assert first == same
    # The block before the image is shared with text and other images; the block where the
    # image starts and every later one differ.
    assert first[0] == text[0] == other[0]
    assert all(a != b for a, b in zip(first[1:], other[1:]))
    assert all(a != b for a, b in zip(first[1:], text[1:]))
