"""The step contract: what the scheduler asks of a forward pass, and what comes back.

`Scheduler.schedule()` returns a `SchedulerOutput`: the rows of the step (which tokens each
sequence feeds, from which position, through which blocks, how many logits rows it wants,
the draft it verifies) and the KV operations the scheduler made on the pools since the last
step.  `ModelRunner.execute()` runs it and returns a `RunnerOutput`: each row's sampled tokens,
their log-probabilities and how much of its draft was accepted.  `Scheduler.update_from_output()`
turns that into events.  (vLLM v1's SchedulerOutput / ModelRunnerOutput split.)

Both are plain data - ints, strings, lists, no MLX arrays and no references to `Sequence`
objects - so that another rank (another process, another host) can receive a step and run the
same pass over its own shard of the weights and its own KV pool.  `to_plain()` / `from_plain()`
give a form that any JSON / msgpack encoder carries (bytes go as hex).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledRow:
    """One sequence's part of a step."""

    request_id: str
    index: int  # which of the request's n completions
    pool: int  # which KV pool its blocks are in (sequence.MAIN_POOL / FLOAT_POOL)
    start: int  # its tokens in the cache before this step: the position of `tokens[0]`
    tokens: list[int]  # the tokens fed: a prompt chunk, or the pending token then the draft
    block_table: list[int]  # its blocks, covering at least start + len(tokens) positions
    want_logits: int  # logits rows wanted at the end of `tokens` (0, 1, or 1 + len(draft))
    draft: list[int] = field(default_factory=list)  # the draft verified (the tail of `tokens`)
    prefill: bool = False  # a prompt chunk (else a decode)
    fan_out: int = 1  # completions sampled from its logits row (n at an n > 1 request's first token)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class KVOps:
    """What the scheduler did to the pools' contents since the last step.  The rank that owns
    the scheduler has already applied them (they happen where the scheduler decides them);
    another rank applies them to its own pools before running the step's rows."""

    # (pool, source block, destination block): a whole block copied within a pool (an n > 1
    # sibling's copy of its parent's partial last block).
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    # (float pool block, main pool block): a sequence's KV moved, quantized, to the main pool.
    migrations: list[tuple[int, int]] = field(default_factory=list)
    # (pool, block, block hash): a block read back from the disk tier into the pool.
    disk_loads: list[tuple[int, int, bytes]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.copies or self.migrations or self.disk_loads)


@dataclass
class SchedulerOutput:
    step: int  # the scheduler's step counter
    rows: list[ScheduledRow] = field(default_factory=list)  # prompt chunks first, then decodes
    kv_ops: KVOps = field(default_factory=KVOps)
    # Each pool's size in blocks now (pools grow and shrink with the memory budget): another
    # rank sizes its own pools to match before it runs the rows.
    pool_blocks: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def num_prefill_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows if r.prefill)

    @property
    def request_ids(self) -> set[str]:
        return {r.request_id for r in self.rows}

    def to_plain(self) -> dict:
        ops = self.kv_ops
        # By hand rather than dataclasses.asdict (which deep-copies through every list): this
        # runs once per step for every other rank.
        plain = {"step": self.step, "rows": [{
            "request_id": r.request_id, "index": r.index, "pool": r.pool, "start": r.start, "tokens": r.tokens,
            "block_table": r.block_table, "want_logits": r.want_logits, "draft": r.draft, "prefill": r.prefill,
            "fan_out": r.fan_out} for r in self.rows], "pool_blocks": list(self.pool_blocks)}
        plain["kv_ops"] = {"copies": [list(c) for c in ops.copies], "migrations": [list(m) for m in ops.migrations],
                           "disk_loads": [[p, b, h.hex()] for p, b, h in ops.disk_loads]}
        return plain

    @classmethod
    def from_plain(cls, plain: dict) -> SchedulerOutput:
        ops = plain["kv_ops"]
        return cls(
            step=plain["step"],
            rows=[ScheduledRow(**{**r, "tokens": list(r["tokens"]), "block_table": list(r["block_table"]),
                                  "draft": list(r["draft"])}) for r in plain["rows"]],
            kv_ops=KVOps(copies=[tuple(c) for c in ops["copies"]], migrations=[tuple(m) for m in ops["migrations"]],
                         disk_loads=[(p, b, bytes.fromhex(h)) for p, b, h in ops["disk_loads"]]),
            pool_blocks=list(plain.get("pool_blocks", [])),
        )


# (logprob of the token, [(alternative token, its logprob), ...]) as the sampler reports it.
LogprobEntry = tuple[float, list[tuple[int, float]]]


@dataclass
class RunnerOutput:
    """Per row of the SchedulerOutput, in its order."""

    # The tokens the row produced: none (a prompt chunk short of the prompt's end), one
    # sampled token, `fan_out` tokens (one per completion, index order), or a verified
    # draft's accepted tokens followed by the model's own.
    sampled: list[list[int]] = field(default_factory=list)
    logprobs: list[list[LogprobEntry] | None] = field(default_factory=list)  # where the request asks
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted (0 without a draft)
    # What this rank's passes left for its own layer managers (recurrent-state snapshots to
    # commit once the step's blocks are hashed): never sent, not part of the contract.
    local: list = field(default_factory=list, compare=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "local": []}  # this rank's own: not sent

    def to_plain(self) -> dict:
        return {"sampled": [list(t) for t in self.sampled],
                "logprobs": [None if e is None else [[lp, [list(a) for a in top]] for lp, top in e]
                             for e in self.logprobs],
                "accepted": list(self.accepted)}

    @classmethod
    def from_plain(cls, plain: dict) -> RunnerOutput:
        return cls(
            sampled=[list(t) for t in plain["sampled"]],
            logprobs=[None if e is None else [(lp, [tuple(a) for a in top]) for lp, top in e]
                      for e in plain["logprobs"]],
            accepted=list(plain["accepted"]),
        )
