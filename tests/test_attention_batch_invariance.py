"""A token's attention does not depend on its batch (omlx/kernels/cpu/paged_attention.cpp):
key tiles on the absolute grid, one scoring order for every unit size, shared prefixes cut to
whole tiles.  The example hypothesis found (tests/test_packed_linear.py's batch-invariance
test): a request sharing one 4-token block with another, prefill chunked by a 5-token budget,
got a different third token beside it than alone, because its units' row counts (and so the
scoring path) and its key tiles' boundaries differed."""

from __future__ import annotations

import pytest
from mlx_lm import load

from omlx.kernels import cpu_features
from omlx.models import packed_weights
from omlx.testing.tiny_models import TinyModelSpec, build_model
from test_packed_linear import SHARED, run_engine

pytestmark = pytest.mark.skipif(cpu_features.cpu_features().bf16_isa is None,
                                reason="the packed path runs only where the CPU has a bf16 unit")


@pytest.mark.usefixtures("attention_kernel")
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_request_beside_a_sharer_answers_as_alone(model_type, tmp_path):
    path = build_model(tmp_path / "m", TinyModelSpec(model_type=model_type, seed=3))
    model, tokenizer = load(str(path))
    packed_weights.pack_model(model)
    eos = frozenset(tokenizer.eos_token_ids)
    prompts = [SHARED[:5] + [5], SHARED[:31] + [364, 385, 64, 203, 481, 497, 390, 340, 458, 415]]
    limits = [7, 3]
    together = run_engine(model, eos, prompts, limits, [0, 0], 4, 5)
    for i, prompt in enumerate(prompts):
        alone = run_engine(model, eos, [prompt], [limits[i]], [0], 4, 5)[0]
        assert together[i] == alone, (i, together[i], alone)
