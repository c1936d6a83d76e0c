"""The admin panel's chat with an audio clip, in a real browser (headless chromium through
Selenium) against a real `omlx serve`: an omni model is listed as taking audio, the clip
picker shows for it (and not for a text model), and a message with a clip gets the answer
`mlx_vlm.generate` gives alone for that clip and text."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from omlx_process import omlx_server
from omlx.testing.tiny_audio import build_audio_model
from omlx.testing.tiny_models import TinyModelSpec, build_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.fail("the browser tests need Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                pytrace=False)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "sk-admin-audio-0123456789"
OMNI, TEXT = "tiny-gemma4-audio", "tiny-text"
WAIT_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("admin-audio-models")
    build_audio_model(root / OMNI)
    build_model(root / TEXT, TinyModelSpec())
    return root


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with omlx_server(model_dir, tmp_path_factory.mktemp("admin-audio-server"), "--api-key", KEY,
                     "--kv-cache-gb", "0.05", failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message)


def clip_file(tmp_path) -> Path:
    import soundfile

    t = np.arange(int(1.3 * 16_000)) / 16_000
    path = tmp_path / "sweep.wav"
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t)).astype(np.float32), 16_000)
    return path


def reference(path: Path, clip: Path, text: str) -> str:
    from mlx_vlm import generate, load
    from mlx_vlm.utils import load_audio

    model, processor = load(str(path))
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False)
    result = generate(model, processor, prompt, audio=[load_audio(io.BytesIO(clip.read_bytes()), sr=16_000)],
                      max_tokens=32, temperature=0.0, verbose=False)
    tokens = list(result.token_ids)
    eos = set(model.config.eos_token_id)
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    return processor.tokenizer.decode(tokens)


def test_chat_with_a_clip(server, browser, tmp_path):
    # Greedy and short, so the answer is comparable with mlx-vlm's alone.
    from omlx_process import call

    status, _ = call(server, "PUT", f"/v1/models/{OMNI}/settings",
                     {"sampling": {"temperature": 0.0}, "max_tokens": 32},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    browser.get(server.root + "/admin")
    until(browser, lambda d: d.find_element(By.ID, "api-key").is_displayed(), "the login form")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "login-button").click()
    until(browser, lambda d: d.find_element(By.ID, "status").is_displayed(), "logged in")
    browser.get(server.root + "/admin#chat")
    until(browser, lambda d: {o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#chat-model option")}
          >= {OMNI, TEXT}, "both models listed")
    select = Select(browser.find_element(By.ID, "chat-model"))
    select.select_by_value(TEXT)
    assert not browser.find_element(By.ID, "chat-audio-box").is_displayed()
    select.select_by_value(OMNI)
    assert "(audio)" in select.first_selected_option.text
    until(browser, lambda d: d.find_element(By.ID, "chat-audio-box").is_displayed(), "the clip picker shows")
    clip = clip_file(tmp_path)
    browser.find_element(By.ID, "chat-audio").send_keys(str(clip))
    browser.find_element(By.ID, "chat-input").send_keys("what do you hear")
    browser.find_element(By.ID, "chat-send").click()
    until(browser, lambda d: d.find_element(By.ID, "chat-send").is_displayed()
          and d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant"), "the reply finishes")
    assert not browser.find_element(By.ID, "chat-error").is_displayed()
    user = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.user .body")[-1].text
    assert "[clip: sweep.wav]" in user
    answer = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant .content")[-1].text
    expected = reference(server.model_path(OMNI), clip, "what do you hear")
    assert expected.strip()  # the clip gets an answer: the comparison means something
    assert answer.strip() == expected.strip()
