"""Speech-to-text models (Whisper checkpoints in mlx-whisper's layout) as pool residents.

mlx-whisper serves a Whisper folder with no hand-written parts: its `load_model` reads the
folder (config.json + weights.safetensors) and its `transcribe` is Whisper's own long-form
loop (30 s windows, the text of each window conditioning the next, segments with
timestamps, word timestamps by cross-attention alignment), its tokenizer ships with the
package (tiktoken files, no download).  mlx-audio's Whisper needs a Hugging Face
WhisperProcessor (a tokenizer with ~1,600 special tokens) in the folder as well; see
bench/README for the comparison.

MLX work runs on one thread per transcriber: mlx-whisper keeps the model it runs in a
process-wide holder, and MLX graphs belong to the thread that builds them, so requests to one
STT model take turns (each is a whole long-form decode).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .clips import SAMPLE_RATE

# One lock for mlx-whisper's process-wide model holder (several STT models may be resident).
_HOLDER_LOCK = threading.Lock()


@dataclass
class TranscriberStats:
    batches: int = 0  # requests served (the field names /health reads for encoders)
    inputs: int = 0  # clips
    tokens: int = 0  # seconds of audio transcribed
    busy_s: float = 0.0


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[dict]  # Whisper's: id, start, end, text, tokens, temperature, avg_logprob, ...
    words: list[dict] = field(default_factory=list)  # word, start, end (when asked for)


class LoadedTranscriber:
    """A pool resident (omlx.models.resident's members): no generation engine, no KV pool,
    no queue the admission bound counts; served by /v1/audio/* only."""

    generates = False
    queued_requests = 0
    kv_pool_grown = False

    def __init__(self, info, model, weights_bytes: int):
        self.info = info
        self.model = model
        self.weights_bytes = weights_bytes
        self.loaded_at = time.time()
        self.stats = TranscriberStats()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stt-{info.model_id}")

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def memory_bytes(self) -> int:
        return self.weights_bytes

    def shrink_kv_pool(self):
        raise NotImplementedError("a transcriber has no KV pool")

    def serving_info(self) -> dict | None:
        return None

    def health(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "batches": self.stats.batches, "inputs": self.stats.inputs,
                "tokens": self.stats.tokens, "kind": "stt"}

    async def transcribe(self, samples: np.ndarray, **options) -> Transcript:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: self.transcribe_sync(samples, **options))

    def transcribe_sync(self, samples: np.ndarray, *, task: str = "transcribe", language: str | None = None,
                        prompt: str | None = None, temperature: float = 0.0, words: bool = False) -> Transcript:
        """Whisper's long-form transcription of 16 kHz mono samples (its thread only)."""
        import importlib

        import mlx_whisper

        # The module, not the function of the same name that the package exports.
        module = importlib.import_module("mlx_whisper.transcribe")

        started = time.perf_counter()
        path = str(self.info.path)
        with _HOLDER_LOCK:
            module.ModelHolder.model, module.ModelHolder.model_path = self.model, path
            result = mlx_whisper.transcribe(
                samples.astype(np.float32), path_or_hf_repo=path, verbose=None, temperature=temperature,
                task=task, language=language, initial_prompt=prompt or None, word_timestamps=words,
                fp16=False)
        duration = len(samples) / SAMPLE_RATE
        self.stats.batches += 1
        self.stats.inputs += 1
        self.stats.tokens += int(round(duration))
        self.stats.busy_s += time.perf_counter() - started
        segments = [{k: v for k, v in s.items() if k != "words"} for s in result["segments"]]
        found = [w for s in result["segments"] for w in s.get("words", [])]
        return Transcript(result["text"], result.get("language") or language or "", duration, segments,
                          [{"word": w["word"], "start": w["start"], "end": w["end"]} for w in found])

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False)


def load_transcriber(info) -> LoadedTranscriber:
    """A Whisper folder through mlx-whisper (float32: MLX's fast dtype on CPU)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.load_models import load_model

    from omlx.vision.loader import evaluate_constants

    model = load_model(str(info.path), dtype=mx.float32)
    # Its sinusoidal position table is built in __init__, outside the parameters: computed
    # here, not first on the transcription thread from this thread's graph.
    evaluate_constants(model)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return LoadedTranscriber(info, model, weights)
