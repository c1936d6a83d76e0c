"""Vision-language models served through omlx's own engine: tiny random-weight Qwen2-VL
(multimodal RoPE, packed vision tower) and LLaVA (CLIP tower + projector) built on the spot,
images through all three APIs with the official SDKs, greedy tokens checked against
`mlx_vlm.generate` run alone on the same prompt and images; prefix-cache hits keyed on the
pixels; every bad image input a 4xx in the route family's shape."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import urllib.request
import json

from omlx_process import omlx_server
from omlx.testing.tiny_models import TinyModelSpec, build_model
from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm

QWEN, LLAVA, TEXT, OCR = "tiny-qwen2-vl", "tiny-llava", "tiny-text", "tiny-ocr"
MAX_PIXELS = 250_000  # the server's image limits in these tests (env)
MAX_BYTES = 400_000
FETCH_TIMEOUT_S = 1.5
PROMPT = "describe the cat in the picture"


def png_bytes(seed: int, size=(80, 100), fmt="PNG") -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def data_url(seed: int, size=(80, 100)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed, size)).decode()


# ---------------------------------------------------------------------------- fixtures


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/image/"):
            body = png_bytes(int(self.path.rsplit("/", 1)[1]))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/slow":
            time.sleep(FETCH_TIMEOUT_S * 3)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-models")
    build_vlm(root / QWEN, TinyVLMSpec(family="qwen2_vl"))
    build_vlm(root / LLAVA, TinyVLMSpec(family="llava", seed=1))
    build_model(root / TEXT, TinyModelSpec())
    build_vlm(root / OCR, TinyVLMSpec(family="qwen2_vl", seed=2, architecture="Qwen2VLOCRForConditionalGeneration"))
    return root


@pytest.fixture(scope="module")
def vserver(vision_models, tmp_path_factory):
    # The image limits come both ways: env vars and a flag.
    env = {"OMLX_IMAGE_MAX_BYTES": str(MAX_BYTES), "OMLX_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)}
    # A small step budget: image prompts are prefilled in several chunks, some ending inside
    # an image's tokens.
    # The image host is a local server: this server may fetch from local addresses (refused
    # by default: tests/test_media_urls.py).
    with omlx_server(vision_models, tmp_path_factory.mktemp("vision-server"), "--kv-cache-gb", "0.05",
                     "--max-num-batched-tokens", "24", "--image-max-pixels", str(MAX_PIXELS),
                     "--allow-local-media-urls", env=env,
                     block_size=16, failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def oai(vserver):
    import openai

    with openai.OpenAI(base_url=vserver.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


# ---------------------------------------------------------------------------- reference

_references: dict = {}


def _vlm(path):
    from mlx_vlm import load

    key = str(path)
    if key not in _references:
        _references[key] = load(key)
    return _references[key]


def reference_text(path, messages: list[dict], images: list[bytes], max_tokens: int) -> str:
    """What `mlx_vlm.generate` answers, greedy and alone, to the chat-templated messages
    (content parts {"type": "image"} where the images go) and the decoded images."""
    from mlx_vlm import generate
    from PIL import Image

    model, processor = _vlm(path)
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    if pictures:
        # mlx-vlm's own input preparation passes tokenizer padding options into the image
        # processor, which transformers 5 refuses for CLIP; the processor is called plainly
        # and generate takes its outputs, as its API allows.
        inputs = processor(text=[prompt], images=pictures)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        result = generate(model, processor, prompt, input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                          mask=inputs["attention_mask"], max_tokens=max_tokens, temperature=0.0, verbose=False, **extra)
    else:
        result = generate(model, processor, prompt, max_tokens=max_tokens, temperature=0.0, verbose=False)
    eos = set(model.config.eos_token_id if isinstance(model.config.eos_token_id, list) else [model.config.eos_token_id])
    tokens = []
    for token in result.token_ids:
        if token in eos:
            break
        tokens.append(token)
    return processor.tokenizer.decode(tokens)


def image_message(seeds: list[int], text: str = PROMPT) -> tuple[dict, dict]:
    """(OpenAI chat message, template message) with these images then the text."""
    wire = [{"type": "image_url", "image_url": {"url": data_url(s)}} for s in seeds]
    template = [{"type": "image"} for _ in seeds]
    return ({"role": "user", "content": wire + [{"type": "text", "text": text}]},
            {"role": "user", "content": template + [{"type": "text", "text": text}]})


# ---------------------------------------------------------------------------- answers


@pytest.mark.parametrize("model", [QWEN, LLAVA])
def test_chat_image_matches_mlx_vlm(oai, vserver, model):
    wire, template = image_message([0])
    response = oai.chat.completions.create(model=model, messages=[wire], max_tokens=12, temperature=0)
    expected = reference_text(vserver.model_path(model), [template], [png_bytes(0)], 12)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens > 8  # the image's tokens are in the prompt


def test_several_images_across_the_conversation(oai, vserver):
    first_wire, first_template = image_message([1, 2], "compare these two")
    second_wire, second_template = image_message([3], "and this one")
    history = [{"role": "assistant", "content": "they differ"}]
    response = oai.chat.completions.create(model=QWEN, messages=[first_wire, *history, second_wire],
                                           max_tokens=10, temperature=0)
    expected = reference_text(vserver.model_path(QWEN), [first_template, *history, second_template],
                              [png_bytes(1), png_bytes(2), png_bytes(3)], 10)
    assert response.choices[0].message.content == expected


def test_concurrent_image_and_text_requests_match_alone(vserver):
    """Image requests of both families and text requests in flight together, arriving
    staggered: each answer equals its model's answer alone."""
    import openai

    cases = []
    for k, (model, seeds) in enumerate([(QWEN, [4]), (LLAVA, [4]), (QWEN, [5, 6]), (LLAVA, [7]), (QWEN, [8])]):
        wire, template = image_message(seeds, PROMPT + " now" * k)
        cases.append((model, [wire], [template], [png_bytes(s) for s in seeds]))
    for model in (QWEN, LLAVA):
        text = {"role": "user", "content": "tell me about the river and the mountain"}
        cases.append((model, [text], [text], []))

    async def run():
        async with openai.AsyncOpenAI(base_url=vserver.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            async def one(k, model, messages):
                await asyncio.sleep(0.15 * k)
                r = await c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
                return r.choices[0].message.content
            return await asyncio.gather(*(one(k, m, w) for k, (m, w, _, _) in enumerate(cases)))

    answers = asyncio.run(run())
    for (model, _, template, images), answer in zip(cases, answers):
        assert answer == reference_text(vserver.model_path(model), template, images, 10), model
    stats = vserver.health()["models_loaded"][QWEN]["vision_stats"]
    assert stats["images_encoded"] >= 4


def test_prefix_cache_keys_on_the_image(oai, vserver):
    """The same image under the same prompt hits the cache past the image; a different image
    with the same text never reuses a block holding image tokens."""
    text = "what animal is in this picture please tell me"
    wire, template = image_message([9], text)
    first = oai.chat.completions.create(model=QWEN, messages=[wire], max_tokens=8, temperature=0)
    again = oai.chat.completions.create(model=QWEN, messages=[wire], max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16

    other_wire, other_template = image_message([10], text)
    other = oai.chat.completions.create(model=QWEN, messages=[other_wire], max_tokens=8, temperature=0)
    # Only the block before the image ("<|im_start|>user\n<|vision_start|>" is 3-4 tokens,
    # less than one 16-token block) could be shared: nothing is.
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == reference_text(vserver.model_path(QWEN), [other_template],
                                                              [png_bytes(10)], 8)


def test_http_image_url(oai, vserver, image_host):
    response = oai.chat.completions.create(model=QWEN, max_tokens=8, temperature=0, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{image_host}/image/11"}},
                                    {"type": "text", "text": PROMPT}]}])
    expected = reference_text(vserver.model_path(QWEN), [image_message([11])[1]], [png_bytes(11)], 8)
    assert response.choices[0].message.content == expected


def test_responses_input_image(oai, vserver):
    response = oai.responses.create(model=QWEN, max_output_tokens=8, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": data_url(12)},
                                    {"type": "input_text", "text": PROMPT}]}])
    expected = reference_text(vserver.model_path(QWEN), [image_message([12])[1]], [png_bytes(12)], 8)
    assert response.output_text == expected


def test_anthropic_image_blocks(vserver, image_host):
    import anthropic

    with anthropic.Anthropic(base_url=vserver.root, api_key="unused", max_retries=0, timeout=120) as client:
        for seed, source in [
            (13, {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png_bytes(13)).decode()}),
            (14, {"type": "url", "url": f"{image_host}/image/14"}),
        ]:
            message = client.messages.create(model=LLAVA, max_tokens=8, extra_body={"temperature": 0}, messages=[{
                "role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": PROMPT}]}])
            expected = reference_text(vserver.model_path(LLAVA), [image_message([seed])[1]], [png_bytes(seed)], 8)
            assert message.content[0].text == expected


def test_streamed_image_answer_and_count_tokens(oai, vserver):
    wire, template = image_message([26])
    stream = oai.chat.completions.create(model=QWEN, messages=[wire], max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference_text(vserver.model_path(QWEN), [template], [png_bytes(26)], 8)
    # Anthropic's count_tokens counts the image's tokens too.
    body = {"model": QWEN, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png_bytes(26)).decode()}},
        {"type": "text", "text": PROMPT}]}]}
    status, counted = _post(vserver, "/v1/messages/count_tokens", body)
    status_text, text_only = _post(vserver, "/v1/messages/count_tokens",
                                   {"model": QWEN, "messages": [{"role": "user", "content": PROMPT}]})
    assert status == status_text == 200
    assert counted["input_tokens"] > text_only["input_tokens"] + 8


def test_text_only_request_to_a_vision_model(oai, vserver):
    messages = [{"role": "user", "content": "hello there model"}]
    response = oai.chat.completions.create(model=QWEN, messages=messages, max_tokens=10, temperature=0)
    assert response.choices[0].message.content == reference_text(vserver.model_path(QWEN), messages, [], 10)


def test_resize_shape(oai, vserver):
    wire, template = image_message([15])
    response = oai.chat.completions.create(model=QWEN, messages=[wire], max_tokens=6, temperature=0,
                                           extra_body={"resize_shape": [56, 56]})
    plain = oai.chat.completions.create(model=QWEN, messages=[wire], max_tokens=6, temperature=0)
    # 56x56 is 4x4 patches: one merged token per 2x2, fewer than the 80x100 image's.
    assert response.usage.prompt_tokens < plain.usage.prompt_tokens


def test_ocr_model_gets_its_default_prompt(oai, vserver):
    """An OCR model (detected from its config) asked with an image and no instruction reads
    the family's default prompt; one with an instruction reads that."""
    from omlx.vision.ocr import GENERIC

    image_only = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(24)}}]}
    response = oai.chat.completions.create(model=OCR, messages=[image_only], max_tokens=8, temperature=0)
    template = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": GENERIC.prompt}]}
    assert response.choices[0].message.content == reference_text(vserver.model_path(OCR), [template],
                                                                 [png_bytes(24)], 8)
    wire, template = image_message([24], "read the title")
    response = oai.chat.completions.create(model=OCR, messages=[wire], max_tokens=8, temperature=0)
    assert response.choices[0].message.content == reference_text(vserver.model_path(OCR), [template],
                                                                 [png_bytes(24)], 8)


def test_ocr_defaults_by_family():
    from omlx.vision.ocr import OCR_FAMILIES, ocr_defaults, with_default_prompt

    for family in ("deepseekocr", "deepseekocr_2", "dots_ocr", "glm_ocr"):
        defaults = ocr_defaults({"model_type": family})
        assert defaults is OCR_FAMILIES[family] and defaults.prompt and defaults.stop
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    assert with_default_prompt(messages, ocr_defaults({"model_type": "glm_ocr"}))[0]["content"][-1] == {
        "type": "text", "text": OCR_FAMILIES["glm_ocr"].prompt}
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "only the date"}]}]
    assert with_default_prompt(asked, OCR_FAMILIES["glm_ocr"]) == asked


def test_ocr_defaults_sit_between_model_and_global_settings():
    from omlx.vision.ocr import OCR_FAMILIES, with_ocr_defaults

    glm = OCR_FAMILIES["glm_ocr"]
    # Global settings only (merged = global): the OCR family's defaults win.
    merged = with_ocr_defaults({"temperature": 0.7, "max_tokens": 100, "stop": ["x"]}, {}, glm)
    assert merged["temperature"] == 0.0 and merged["repetition_penalty"] == 1.1
    assert merged["max_tokens"] == glm.max_tokens and merged["stop"] == list(glm.stop)
    # The model's own settings win over the family's.
    model = {"sampling": {"temperature": 0.3, "stop": ["y"]}, "max_tokens": 50}
    merged = with_ocr_defaults({"temperature": 0.3, "max_tokens": 50, "stop": ["y"]}, model, glm)
    assert merged["temperature"] == 0.3 and merged["max_tokens"] == 50 and merged["stop"] == ["y"]
    assert merged["repetition_penalty"] == 1.1


# ---------------------------------------------------------------------------- status


def test_status_says_which_models_take_images(vserver):
    def get(path):
        with urllib.request.urlopen(vserver.root + path, timeout=10) as r:
            return json.loads(r.read())

    status = {m["id"]: m for m in get("/v1/models/status")["models"]}
    assert status[QWEN]["vision"] is True and status[QWEN]["model_type"] == "vlm"
    assert status[TEXT]["vision"] is False
    assert status[OCR]["model_type"] == "ocr" and status[OCR]["vision"] is True
    lm = {m["key"]: m for m in get("/api/v1/models")["models"]}
    assert lm[LLAVA]["capabilities"]["vision"] is True
    assert lm[TEXT]["capabilities"]["vision"] is False
    health = vserver.health()["models_loaded"]
    assert health[QWEN]["vision"] is True


# ---------------------------------------------------------------------------- bad input


def _post(vserver, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(vserver.root + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _chat_with(url: str, model: str = QWEN) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


def bad_inputs(image_host) -> list[tuple[str, str, int, str]]:
    big = png_bytes(16, size=(600, 600))  # 360,000 pixels, over MAX_PIXELS
    noisy = png_bytes(17, size=(480, 480))  # ~690 kB of noise, over MAX_BYTES
    tiff = png_bytes(18, fmt="TIFF")
    return [
        ("corrupt base64", "data:image/png;base64,@@@not-base64@@@", 400, "invalid_image"),
        ("not an image", "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), 400,
         "unsupported_image_format"),
        ("truncated", "data:image/png;base64," + base64.b64encode(png_bytes(19)[:200]).decode(), 400, "invalid_image"),
        ("unsupported format", "data:image/tiff;base64," + base64.b64encode(tiff).decode(), 400,
         "unsupported_image_format"),
        ("tiff behind a png type", "data:image/png;base64," + base64.b64encode(tiff).decode(), 400,
         "unsupported_image_format"),
        ("over the pixel limit", "data:image/png;base64," + base64.b64encode(big).decode(), 413, "image_too_large"),
        ("over the byte limit", "data:image/png;base64," + base64.b64encode(noisy).decode(), 413, "image_too_large"),
        ("url 404", f"{image_host}/missing.png", 400, "image_fetch_failed"),
        ("url timeout", f"{image_host}/slow", 400, "image_fetch_timeout"),
        ("unreachable url", "http://127.0.0.1:9/x.png", 400, "image_fetch_failed"),
        ("file path", "/etc/passwd", 400, "invalid_image"),
    ]


def test_bad_images_get_4xx_while_others_are_served(vserver, image_host):
    """Every bad image is a clear 4xx (OpenAI shape), and a good request in flight at the same
    time is answered as if alone."""
    wire, template = image_message([20])
    good_body = {"model": QWEN, "max_tokens": 10, "temperature": 0, "messages": [wire]}
    cases = bad_inputs(image_host)
    results: dict = {}

    def good():
        results["good"] = _post(vserver, "/v1/chat/completions", good_body)

    thread = threading.Thread(target=good)
    thread.start()
    for name, url, status, code in cases:
        got_status, body = _post(vserver, "/v1/chat/completions", _chat_with(url))
        assert got_status == status, (name, body)
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["param"].startswith("messages[0].content"), (name, body)
        assert body["error"]["message"]
    thread.join()
    status, body = results["good"]
    assert status == 200
    assert body["choices"][0]["message"]["content"] == reference_text(vserver.model_path(QWEN), [template],
                                                                     [png_bytes(20)], 10)


def test_image_to_a_text_model_is_refused(vserver):
    status, body = _post(vserver, "/v1/chat/completions", _chat_with(data_url(21), model=TEXT))
    assert status == 400 and body["error"]["code"] == "unsupported_content"
    assert "accepts text only" in body["error"]["message"]


def test_image_token_spelled_in_text_is_refused(vserver):
    """Text that spells the model's image token cannot make the engine place features that
    do not exist: a 400, and the model keeps serving."""
    for model, token in [(QWEN, "<|image_pad|>"), (LLAVA, "<image>")]:
        body = _chat_with(data_url(25), model=model)
        body["messages"][0]["content"][1]["text"] = f"look {token} here"
        status, out = _post(vserver, "/v1/chat/completions", body)
        assert status == 400 and out["error"]["code"] == "invalid_image", out
    status, _ = _post(vserver, "/v1/chat/completions", _chat_with(data_url(25), model=LLAVA))
    assert status == 200


def test_too_many_images_for_a_single_image_family(vserver):
    body = {"model": LLAVA, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(22)}},
        {"type": "image_url", "image_url": {"url": data_url(23)}}]}]}
    status, out = _post(vserver, "/v1/chat/completions", body)
    assert status == 400 and out["error"]["code"] == "too_many_images"


def test_anthropic_bad_images_in_anthropic_shape(vserver, image_host):
    def message(source):
        return {"model": QWEN, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": source}, {"type": "text", "text": "hi"}]}]}

    for source, status in [
        ({"type": "base64", "media_type": "image/png", "data": "!!!"}, 400),
        ({"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(png_bytes(1)).decode()}, 400),
        ({"type": "url", "url": f"{image_host}/missing.png"}, 400),
        ({"type": "file", "file_id": "x"}, 400),
    ]:
        got, body = _post(vserver, "/v1/messages", message(source))
        assert got == status, body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    got, body = _post(vserver, "/v1/messages", {**message({"type": "base64", "media_type": "image/png",
                                                          "data": base64.b64encode(png_bytes(1)).decode()}),
                                                "model": TEXT})
    assert got == 400 and body["type"] == "error"


@pytest.mark.slow
def test_image_limits_from_flags_env_and_defaults():
    from omlx.cli import build_parser, serving_limits
    from omlx.settings import SettingsError, resolve_server_options
    from omlx.vision.images import ImageLimits

    assert serving_limits(resolve_server_options({}, {}, {})).images == ImageLimits()
    env = {"OMLX_IMAGE_MAX_BYTES": "5MB", "OMLX_IMAGE_MAX_COUNT": "4"}
    args = build_parser().parse_args(["serve", "--image-max-count", "2", "--image-fetch-timeout", "3.5"])
    images = serving_limits(resolve_server_options(vars(args), env, {})).images
    assert images == ImageLimits(max_bytes=5 << 20, max_pixels=ImageLimits().max_pixels, fetch_timeout_s=3.5,
                                 max_images=2)  # the flag wins over the env var
    with pytest.raises(SettingsError, match="OMLX_IMAGE_MAX_PIXELS"):
        resolve_server_options({}, {"OMLX_IMAGE_MAX_PIXELS": "lots"}, {})
