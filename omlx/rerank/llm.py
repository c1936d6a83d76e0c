"""LLM rerankers (Qwen3-Reranker style): a causal LM asked whether a document meets a query,
scored by its next-token odds of "yes" against "no".

The prompt is the one the Qwen3-Reranker model card documents (a fixed system turn, the
instruction, query and document in the user turn, an empty thinking block), and the score is
softmax([logit("no"), logit("yes")])[1] at its last position.  Each (query, document) prompt
is an ordinary one-token generation request on the model's LLM engine, so prompts batch
with each other and with chat traffic, and their shared head (system turn, instruction and
query) comes from the prefix cache after the first.

The engine reports log-probabilities after a request's token constraint is applied; a
constraint that allows only "yes" and "no" makes the reported pair exactly the two-way
softmax, with no change to the engine.
"""

from __future__ import annotations

import asyncio
import math
import uuid

import numpy as np

from omlx.constrained.base import TokenConstraint
from omlx.scheduler import GenerationRequest, RequestRejected

from .chunks import document_pieces

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
          "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
          "<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 8192  # the model card's prompt limit


class RerankFailed(RuntimeError):
    """The engine could not score a prompt; `code` is the engine's error code, if any."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def format_pair(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of the single tokens "yes" and "no", or ValueError."""
    ids = []
    for word in ("yes", "no"):
        token = tokenizer.convert_tokens_to_ids(word)
        if not isinstance(token, int) or token < 0 or token == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"this model's vocabulary has no single '{word}' token, so it cannot "
                             "be scored as a yes/no reranker")
        ids.append(token)
    return ids[0], ids[1]


class AnswerConstraint(TokenConstraint):
    """Allows exactly the answer tokens; also its own factory (it has no per-sequence state)."""

    def __init__(self, token_ids: tuple[int, ...]):
        self.token_ids = token_ids
        self.num_words = max(token_ids) // 32 + 1

    def new_state(self, max_tokens: int) -> "AnswerConstraint":
        return self

    def fill_bitmask(self, row: np.ndarray) -> None:
        words = row.view(np.uint32)
        for token in self.token_ids:
            words[token // 32] |= np.uint32(1 << (token % 32))

    def accept(self, token: int) -> None:
        pass


class LLMReranker:
    """Scores (query, document) pairs on a resident LLM (omlx.models.loaded.LoadedModel)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.yes, self.no = answer_token_ids(self.tokenizer)
        self.constraint = AnswerConstraint((self.yes, self.no))
        self.prefix = self._encode(PREFIX)
        self.suffix = self._encode(SUFFIX)
        # One token must remain to generate, and the whole prompt must fit the KV pool.
        self.max_length = min(MAX_LENGTH, loaded.context_window - 1, loaded.kv_capacity_tokens - 1)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompts(self, query: str, documents: list[str], instruction: str | None = None,
                max_chunks: int = 1, max_doc_tokens: int | None = None) -> tuple[list[list[int]], list[int]]:
        """The prompt token ids for each (query, document piece), and each one's document."""
        instruction = instruction or DEFAULT_INSTRUCTION
        room = self.max_length - len(self.prefix) - len(self.suffix)
        head = len(self._encode(format_pair(instruction, query, "")))
        if room - head < 1:
            from .cross_encoder import QueryTooLong

            raise QueryTooLong(f"the query and instruction are too long for this model's "
                               f"{self.max_length}-token reranking prompt")
        hf_tokenizer = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
        prompts, owners = [], []
        for index, document in enumerate(documents):
            for piece in document_pieces(hf_tokenizer, document, room - head, max_chunks, max_doc_tokens):
                # As the model card does: the formatted pair is tokenized whole and cut to fit.
                body = self._encode(format_pair(instruction, query, piece))[:room]
                prompts.append(self.prefix + body + self.suffix)
                owners.append(index)
        return prompts, owners

    async def score(self, prompts: list[list[int]]) -> np.ndarray:
        """P("yes") against "no" after each prompt; all prompts go to the engine at once."""
        tag = uuid.uuid4().hex[:12]
        return np.array(await asyncio.gather(*(self._score_one(f"rerank-{tag}-{i}", p)
                                               for i, p in enumerate(prompts))), dtype=np.float32)

    async def _score_one(self, request_id: str, prompt: list[int]) -> float:
        try:  # checked here, where it is built: the engine trusts what it is given
            # One token: nothing for speculative decoding to draft.
            request = GenerationRequest(request_id=request_id, prompt_token_ids=prompt, max_tokens=1,
                                        logprobs=2, constraint=self.constraint, speculative=False)
            self.loaded.check(request)
        except RequestRejected as exc:
            raise RerankFailed(str(exc), "rejected") from None
        async for event in self.loaded.generate(request):
            if event.error is not None:
                raise RerankFailed(event.error, event.error_code)
            if event.top_logprobs is not None:
                odds = dict(event.top_logprobs)
                return math.exp(odds[self.yes]) if self.yes in odds else 0.0
        raise RerankFailed("the engine ended the request without a token")
