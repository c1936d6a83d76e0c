"""The conversation every API family is translated into, and its rendering into a prompt.

Chat completions, Anthropic messages and Responses each parse their own wire format into a
`Conversation`: chat-template messages in the Hugging Face convention (roles system / user /
assistant / tool; assistant `tool_calls` with `arguments` as an object; tool results with
`tool_call_id`; earlier reasoning as `reasoning_content`), tools as OpenAI function tools
(what chat templates and mlx-lm's tool parsers expect), and how the model may use them.  The
model's own chat template then renders it, tools included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import APIError, invalid
from .prompt_bound import PromptTooLong, check_chars, check_length, encode_within, renders_user_text, user_text_chars

# Keys the server sets itself; a client's chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = {"tools", "add_generation_prompt", "tokenize", "conversation", "messages"}


@dataclass(frozen=True)
class ToolChoice:
    """How the model may use the offered tools, the same for every API family.

    mode: "auto" (the model decides), "none" (no calls: tools are not offered), "required"
    (at least one call, any tool) or "function" (a call to `name`).
    """

    mode: str = "auto"
    name: str | None = None

    @property
    def forces_call(self) -> bool:
        return self.mode in ("required", "function")


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    template_kwargs: dict = field(default_factory=dict)

    @property
    def images(self) -> list:
        """The images of its messages (omlx.vision.images.ImageSource), in the order the chat
        template renders them (messages with images have a list of parts as content)."""
        from .image_parts import conversation_images

        return conversation_images(self.messages)

    @property
    def offered_tools(self) -> list[dict]:
        """The tools the model sees: none when tool_choice is "none"."""
        return [] if self.tool_choice.mode == "none" else self.tools

    def tool_named(self, name: str) -> dict | None:
        return next((t for t in self.tools if t["function"]["name"] == name), None)


def function_tool(name, description, parameters, where: str) -> dict:
    """Validate one function tool and put it in the OpenAI chat shape templates expect."""
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name must be a non-empty string", f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.description must be a string", f"{where}.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(f"{where} parameters must be a JSON schema object", where)
    function = {"name": name, "description": description, "parameters": parameters}
    if not description:
        del function["description"]
    return {"type": "function", "function": function}


def check_tool_choice(choice: ToolChoice, tools: list[dict], param: str) -> ToolChoice:
    if choice.mode in ("required", "function") and not tools:
        raise invalid(f"'{param}' requires a tool call, but no tools were given", param)
    if choice.mode == "function" and not any(t["function"]["name"] == choice.name for t in tools):
        raise invalid(f"'{param}' names the tool {choice.name!r}, which is not among the tools given", param)
    return choice


def arguments_object(arguments, where: str) -> dict:
    """Tool-call arguments as the object chat templates render: from a JSON string or a dict."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise invalid(f"{where} must be a JSON object encoded as a string", where) from None
    if not isinstance(arguments, dict):
        raise invalid(f"{where} must be a JSON object", where)
    return arguments


def assistant_tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def template_kwargs(raw, param: str = "chat_template_kwargs") -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid(f"'{param}' must be an object", param, "invalid_type")
    return {k: v for k, v in raw.items() if k not in _RESERVED_TEMPLATE_KWARGS}


def render_prompt(tokenizer, conversation: Conversation, param: str = "messages", tokenize: bool = True):
    """Prompt token ids from the model's chat template, with the tools it is offered (the
    prompt text with `tokenize=False`: a vision model's processor tokenizes it with its images)."""
    kwargs = dict(conversation.template_kwargs)
    if conversation.offered_tools:
        kwargs["tools"] = conversation.offered_tools
    try:
        ids = tokenizer.apply_chat_template(
            conversation.messages, add_generation_prompt=True, tokenize=tokenize, **kwargs
        )
    except Exception as exc:  # the model's own template rejected these messages
        raise invalid(f"the chat template could not render these messages: {exc}", param) from None
    if not tokenize:
        return ids
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids_within(tokenizer, prompt: "Conversation | str", window: int, param: str = "messages") -> list[int]:
    """Prompt token ids of a conversation (through its chat template) or of a raw completion
    prompt, refused with context_length_exceeded as soon as it is certain they cannot leave
    room in `window` (without tokenizing all of a prompt that is far too long).  CPU work:
    run it in omlx.api.offload."""
    if isinstance(prompt, str):
        text, add_special = prompt, True
    else:
        check_message_count(prompt, window, param)
        check_user_text(tokenizer, prompt, window, param)
        text, add_special = render_prompt(tokenizer, prompt, param, tokenize=False), False
    try:
        return encode_within(tokenizer, text, window, add_special_tokens=add_special)
    except PromptTooLong as exc:
        raise context_too_long(exc, window, param) from None


def check_message_count(conversation: Conversation, window: int, param: str = "messages") -> None:
    """context_length_exceeded for more messages than the window has tokens, before any is
    rendered: every chat template marks each message it renders with at least a role token,
    and rendering hundreds of thousands of tiny messages would take seconds of CPU."""
    if len(conversation.messages) >= window:
        raise context_too_long(PromptTooLong(len(conversation.messages), exact=False), window, param)


def check_user_text(tokenizer, conversation: Conversation, window: int, param: str = "messages") -> None:
    """context_length_exceeded before the template is rendered when the users' own text already
    cannot fit, where the model's template is seen to render it as it is: rendering copies a
    20 MiB message several times over while holding the GIL (about 0.1 s of every other
    thread's time, the event loop's and the engine's included)."""
    if not renders_user_text(tokenizer):
        return
    try:
        check_length(tokenizer, user_text_chars(conversation.messages), window)
    except PromptTooLong as exc:
        raise context_too_long(exc, window, param) from None


def check_prompt_chars(tokenizer, text: str, window: int, param: str = "messages") -> None:
    """context_length_exceeded when a rendered prompt's length alone proves it cannot fit."""
    try:
        check_chars(tokenizer, text, window)
    except PromptTooLong as exc:
        raise context_too_long(exc, window, param) from None


def context_too_long(exc: PromptTooLong, window: int, param: str) -> APIError:
    count = f"{exc.at_least} tokens" if exc.exact else f"at least {exc.at_least} tokens"
    return invalid(
        f"This model's maximum context length is {window} tokens, but the prompt has {count}. "
        "Shorten the prompt.", param, "context_length_exceeded")
