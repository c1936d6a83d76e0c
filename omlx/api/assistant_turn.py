"""One generated assistant turn as parsed output: visible text, reasoning and tool calls.

Wraps a GenerationStream (token ids to text deltas, stop strings) with one OutputParser per
choice, so every API family formats the same events.  The finish reason becomes
"tool_calls" when a choice ended by making calls.

`steps()` is the typed event source every streaming writer reads (through omlx.api.sse_pump):
one `ChoiceStep` per piece of a choice's output, with the logprobs of its tokens and whether
the choice ended there.  A text completion (no parsing) is a `TextTurn` with the same steps.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field

from .conversation import Conversation
from .generation import GenerationStream, TokenLogprob
from .output_parser import OutputEvent, OutputParser, Reasoning, Text, ToolCall, ToolCallEvent


@dataclass
class ChoiceStep:
    """What one choice produced since the last step: its parsed events, the logprobs of its
    new tokens (empty unless asked for) and whether it finished with them."""

    index: int
    events: list = field(default_factory=list)  # OutputEvents (and a tool loop's own events)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False


class AssistantTurn:
    def __init__(
        self,
        stream: GenerationStream,
        prompt_ids: list[int],
        conversation: Conversation | None = None,
        tool_parser: str | None = None,
        call_id_prefix: str = "call",
    ):
        self.stream = stream
        tools = conversation.offered_tools if conversation else []
        self.parallel_tool_calls = conversation.parallel_tool_calls if conversation else True
        tokenizer = stream.loaded.tokenizer
        self.parsers = [
            OutputParser.for_tokenizer(tokenizer, prompt_ids, tools or None, tool_parser, call_id_prefix)
            for _ in stream.choices
        ]

    @property
    def usage(self):
        return self.stream.usage

    def tool_calls(self, index: int = 0) -> list[ToolCall]:
        calls = self.parsers[index].tool_calls
        return calls if self.parallel_tool_calls else calls[:1]

    def finish_reason(self, index: int = 0) -> str:
        reason = self.stream.choices[index].finish_reason
        if self.tool_calls(index) and reason in (None, "stop"):
            return "tool_calls"
        return reason or "stop"

    def matched_stop(self, index: int = 0) -> str | None:
        """The stop string that ended this choice, if one did."""
        choice = self.stream.choices[index]
        return choice.text.matched_stop if choice.finish_reason == "stop" else None

    def feed(self, choice, delta: str) -> list[OutputEvent]:
        """The events of a choice's next text delta (and of its end, once it finished).
        For callers that drive the GenerationStream themselves."""
        parser = self.parsers[choice.index]
        calls_before = len(parser.tool_calls)
        events = parser.feed(delta) if delta else []
        if choice.finish_reason is not None:
            events += parser.finish()
        if self.parallel_tool_calls:
            return events
        kept = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                if calls_before:
                    continue  # one call is all this request allows
                calls_before += 1
            kept.append(event)
        return kept

    async def steps(self):
        """Yield a ChoiceStep for each piece of output, in the order the engine makes it."""
        single = len(self.parsers) == 1
        async with aclosing(self.stream.choice_deltas()) as deltas:
            async for choice, delta in deltas:
                yield ChoiceStep(choice.index, self.feed(choice, delta), choice.take_logprobs(),
                                 choice.finish_reason is not None)
                if single and self.parsers[0].tool_calls and not self.parallel_tool_calls:
                    return  # its one call is made: leaving ends (aborts) the generation

    async def events(self):
        """The events of a single-choice turn."""
        async with aclosing(self.steps()) as steps:
            async for step in steps:
                for event in step.events:
                    yield event


class TextTurn:
    """A text completion's output as steps: its text unparsed (no reasoning, no tools)."""

    def __init__(self, stream: GenerationStream):
        self.stream = stream

    @property
    def usage(self):
        return self.stream.usage

    def finish_reason(self, index: int = 0) -> str:
        return self.stream.choices[index].finish_reason or "stop"

    async def steps(self):
        async with aclosing(self.stream.choice_deltas()) as deltas:
            async for choice, delta in deltas:
                yield ChoiceStep(choice.index, [Text(delta)] if delta else [], choice.take_logprobs(),
                                 choice.finish_reason is not None)


async def collect_turn(turn: AssistantTurn) -> list[OutputEvent]:
    """All of a single-choice turn's events, adjacent text merged."""
    out: list[OutputEvent] = []
    async with aclosing(turn.events()) as events:
        async for event in events:
            if out and type(out[-1]) is type(event) and isinstance(event, (Text, Reasoning)):
                out[-1] = type(event)(out[-1].text + event.text)
            else:
                out.append(event)
    return out
