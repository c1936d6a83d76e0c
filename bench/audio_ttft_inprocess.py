#!/usr/bin/env python
"""In-process time to first token for one clip (run from the repo root, after bench/audio_bench.py has built
the model; LD_PRELOAD OpenBLAS as the servers have it): omlx's engine (tower + prefill in its step)
against mlx_vlm.stream_generate, alternating, same clips, same model (bench/models/audio-bench)."""
import base64, sys, time, statistics
sys.path.insert(0, "bench"); sys.path.insert(0, "tests")
import mlx.core as mx
from audio_bench import clip_wav
from mlx_vlm import load, stream_generate
from omlx.audio.clips import decode
from omlx.audio.prompt import prepare
from omlx.scheduler.engine import EngineConfig, LLMEngine
from omlx.scheduler.request import GenerationRequest
from omlx.vision.encoder import LanguageAdapter, PassInputs
model, proc = load("bench/models/audio-bench")
tmpl = proc.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Describe what you hear in this clip."}]}], tokenize=False, add_generation_prompt=True)
engine = LLMEngine(LanguageAdapter(model), EngineConfig(block_size=16, num_blocks=512, max_num_batched_tokens=512), context_window=4096, vision=PassInputs(model))
omlx_t, vlm_t = [], []
for k in range(8):
    clip = decode(base64.b64decode(clip_wav(700 + k)), "a")
    t0 = time.perf_counter()
    ids, mm = prepare(proc, None, model.config.audio_token_id, tmpl, [], [clip])
    engine.add_request(GenerationRequest(f"r{k}", ids, 1, multimodal=mm))
    while engine.has_work:
        engine.step()
    t1 = time.perf_counter()
    for r in stream_generate(model, proc, tmpl, audio=[clip.samples], max_tokens=1, temperature=0.0):
        break
    t2 = time.perf_counter()
    if k:  # the first is warm-up
        omlx_t.append(t1 - t0); vlm_t.append(t2 - t1)
print("omlx engine TTFT median %.3f s  mlx_vlm.stream_generate %.3f s  ratio %.2f" % (
    statistics.median(omlx_t), statistics.median(vlm_t), statistics.median(omlx_t) / statistics.median(vlm_t)))
print("omlx", [round(x, 3) for x in omlx_t]); print("mlx_vlm", [round(x, 3) for x in vlm_t])
