"""The admin panel in a real browser (Debian's headless chromium driven by Selenium through
chromium-driver) against a real `omlx serve` with an API key: log in, see the models, load and
unload one with a click, edit a setting and see it persist and apply, chat and see tokens
stream (with reasoning and a tool call), watch a log line arrive, download a model from the
local fake hub, and see the status page count it all.  A screenshot of each page is saved under
tests/artifacts/admin/ (git-ignored).

The tests in this module share one server and one browser and run in order."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from fake_hub import FakeHub, RunningHub
from omlx_process import call, omlx_server
from omlx.testing.tiny_models import TinyModelSpec, build_model, build_scripted_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.fail("the browser tests need Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                pytrace=False)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "sk-admin-panel-0123456789"
ARTIFACTS = Path(__file__).parent / "artifacts" / "admin"
WAIT_S = 60
SCRIPTED_REPLY = [
    "<think>", "I should look it up.", "</think>",
    "Checking the weather now.",
    "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": "Paris", "days": 2}}\n', "</tool_call>",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("panel-models")
    build_model(root / "tiny", TinyModelSpec())
    build_scripted_model(root / "scripted", SCRIPTED_REPLY)
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repo = tmp_path_factory.mktemp("panel-hub-repo")
    build_model(repo, TinyModelSpec(seed=7))
    with RunningHub(FakeHub({"test-org/tiny-hub-model": repo})) as running:
        yield running


@pytest.fixture(scope="module")
def server(model_dir, hub, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("panel-server")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf-home")}
    with omlx_server(model_dir, workdir, "--api-key", KEY, "--kv-cache-gb", "0.05", env=env,
                     failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, condition, message: str):
    """Wait for `condition(driver)` to be truthy (the page updates asynchronously)."""
    def check(d):
        try:
            return condition(d)
        except StaleElementReferenceException:  # re-rendered while we looked
            return False
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(check, message)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def visible(driver, css: str) -> bool:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def model_row(driver, model_id: str):
    return driver.find_element(By.CSS_SELECTOR, f'#models-table tr[data-model-id="{model_id}"]:not(.settings-row)')


def badges(driver, model_id: str) -> str:
    return model_row(driver, model_id).find_element(By.CSS_SELECTOR, ".badges").text


def test_login(server, browser):
    browser.get(server.root + "/admin")
    until(browser, lambda d: visible(d, "#login"), "the login form should show")
    assert not visible(browser, "#status")
    browser.find_element(By.ID, "api-key").send_keys("sk-wrong")
    browser.find_element(By.ID, "login-button").click()
    until(browser, lambda d: "Invalid API key" in d.find_element(By.ID, "login-error").text, "a wrong key is refused")
    shot(browser, "login")
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(KEY)
    browser.find_element(By.ID, "login-button").click()
    until(browser, lambda d: visible(d, "#status"), "the status page follows the login")
    cookie = browser.get_cookie("omlx_admin_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The key itself is never kept by the page.
    assert KEY not in browser.page_source


def test_models_load_and_unload_with_a_click(server, browser):
    browser.get(server.root + "/admin#models")
    until(browser, lambda d: "not loaded" in badges(d, "tiny"), "tiny is listed, not loaded")
    row = model_row(browser, "tiny")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "llm" and cells[3] and cells[4] == "mlx" and cells[5] == "4096"
    assert "scripted" in browser.find_element(By.ID, "models-table").text
    row.find_element(By.CSS_SELECTOR, 'button[data-action="load"]').click()
    until(browser, lambda d: "loaded" in badges(d, "tiny").split(), "the badge turns to loaded")
    status = {m["id"]: m for m in call(server, "GET", "/v1/models/status", headers={"x-api-key": KEY})[1]["models"]}
    assert status["tiny"]["loaded"]
    shot(browser, "models-loaded")
    model_row(browser, "tiny").find_element(By.CSS_SELECTOR, 'button[data-action="unload"]').click()
    until(browser, lambda d: "not loaded" in badges(d, "tiny"), "the badge turns back to not loaded")


def settings_form(browser, model_id: str):
    return browser.find_element(By.CSS_SELECTOR, f'form.settings-form[data-model-id="{model_id}"]')


def test_edit_a_setting_and_see_it_persist(server, browser):
    browser.get(server.root + "/admin#models")
    until(browser, lambda d: model_row(d, "tiny"), "tiny is listed")
    model_row(browser, "tiny").find_element(By.CSS_SELECTOR, 'button[data-action="settings"]').click()
    until(browser, lambda d: settings_form(d, "tiny").find_elements(By.NAME, "alias"), "the settings form opens")
    form = settings_form(browser, "tiny")
    # A value the API's validation refuses shows its message and saves nothing.
    form.find_element(By.NAME, "ttl").send_keys("-5")
    form.find_element(By.CSS_SELECTOR, 'button[data-action="save-settings"]').click()
    until(browser, lambda d: "ttl" in d.find_element(By.CSS_SELECTOR, "tr.settings-row .error").text,
          "the validation error is shown")
    form.find_element(By.NAME, "ttl").clear()
    form.find_element(By.NAME, "alias").send_keys("tiny-alias")
    form.find_element(By.NAME, "max_tokens").send_keys("40")
    form.find_element(By.CSS_SELECTOR, 'button[data-action="save-settings"]').click()
    until(browser, lambda d: "alias: tiny-alias" in badges(d, "tiny"), "the alias badge appears")
    saved = call(server, "GET", "/v1/models/tiny/settings", headers={"x-api-key": KEY})[1]["settings"]
    assert saved["alias"] == "tiny-alias" and saved["max_tokens"] == 40 and "ttl" not in saved
    on_disk = json.loads((server.log_path.parent / "home" / "model_settings.json").read_text())
    assert on_disk["tiny"]["alias"] == "tiny-alias"
    shot(browser, "models-settings")
    # A fresh page shows the saved values.
    browser.refresh()
    until(browser, lambda d: model_row(d, "tiny"), "tiny is listed again")
    model_row(browser, "tiny").find_element(By.CSS_SELECTOR, 'button[data-action="settings"]').click()
    until(browser, lambda d: settings_form(d, "tiny").find_element(By.NAME, "alias").get_attribute("value")
          == "tiny-alias", "the alias persisted")
    assert settings_form(browser, "tiny").find_element(By.NAME, "max_tokens").get_attribute("value") == "40"
    # Any other setting through the JSON editor, with the same validation.
    form = settings_form(browser, "tiny")
    form.find_element(By.CSS_SELECTOR, "details.raw-settings summary").click()
    raw = form.find_element(By.NAME, "raw")
    current = json.loads(raw.get_attribute("value"))
    assert current == {"alias": "tiny-alias", "max_tokens": 40, "pinned": False}
    for bad, message in (({**current, "bogus": 1}, "'bogus' is not a model setting"), ("[1]", "not a JSON object")):
        raw.clear()
        raw.send_keys(bad if isinstance(bad, str) else json.dumps(bad))
        form.find_element(By.CSS_SELECTOR, 'button[data-action="save-json"]').click()
        until(browser, lambda d: message in d.find_element(By.CSS_SELECTOR, "tr.settings-row .error").text, message)
    raw.clear()
    raw.send_keys(json.dumps({**current, "chat_template_kwargs": {"enable_thinking": False}}))
    form.find_element(By.CSS_SELECTOR, 'button[data-action="save-json"]').click()
    until(browser, lambda d: call(server, "GET", "/v1/models/tiny/settings", headers={"x-api-key": KEY})[1]
          ["settings"].get("chat_template_kwargs") == {"enable_thinking": False}, "the JSON edit is saved")


# Records every length the streaming reply's text had, as the page re-renders it.
WATCH_STREAM = """
window.__lengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('#chat-log .msg.assistant .content');
  if (replies.length) window.__lengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});
"""


def send_chat(browser, model: str, text: str) -> None:
    until(browser, lambda d: any(o.get_attribute("value") == model
                                 for o in d.find_elements(By.CSS_SELECTOR, "#chat-model option")), "models listed")
    Select(browser.find_element(By.ID, "chat-model")).select_by_value(model)
    browser.find_element(By.ID, "chat-input").send_keys(text)
    browser.find_element(By.ID, "chat-send").click()


def test_chat_streams_tokens(server, browser):
    browser.get(server.root + "/admin#chat")
    browser.execute_script(WATCH_STREAM)
    # The tiny model writes its 40 tokens faster than a busy browser may read them; a slow
    # link (about 1 KB/s) makes the stream arrive in pieces whatever the machine's load.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": 1000, "uploadThroughput": -1})
    try:
        send_chat(browser, "tiny", "Hello, who are you?")
        until(browser, lambda d: d.find_element(By.ID, "chat-send").is_displayed()
              and d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant"), "the reply finishes")
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    assert not browser.find_element(By.ID, "chat-error").is_displayed()
    lengths = [n for n in browser.execute_script("return window.__lengths") if n]
    # The text grew over several renders, not all at once at the end.
    # (Not necessarily monotonic: markdown markup vanishes from the text once it closes.)
    assert len(set(lengths)) >= 2 and lengths[0] < lengths[-1], lengths
    shot(browser, "chat")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def test_chat_shows_reasoning_and_tool_calls(server, browser):
    browser.get(server.root + "/admin#chat")
    browser.find_element(By.ID, "chat-clear").click()
    browser.find_element(By.CSS_SELECTOR, "#chat-tools-box summary").click()
    browser.find_element(By.ID, "chat-tools").send_keys(json.dumps([WEATHER_TOOL]))
    send_chat(browser, "scripted", "What is the weather in Paris?")
    until(browser, lambda d: d.find_element(By.ID, "chat-send").is_displayed()
          and "Checking the weather now." in d.find_element(By.ID, "chat-log").text, "the scripted reply arrives")
    reply = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1]
    reasoning = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert "I should look it up." in reasoning.get_attribute("textContent")
    assert "<think>" not in reply.text
    call_text = reply.find_element(By.CSS_SELECTOR, ".tool-call").text
    assert "get_weather" in call_text and '"city": "Paris"' in call_text
    shot(browser, "chat-reasoning-tools")


def test_a_log_line_appears_live(server, browser):
    browser.get(server.root + "/admin#logs")
    until(browser, lambda d: d.find_element(By.ID, "log-state").text == "live", "the log stream connects")
    assert call(server, "POST", "/v1/models/tiny/load", headers={"x-api-key": KEY})[0] == 200
    until(browser, lambda d: "loaded tiny in" in d.find_element(By.ID, "log-lines").text, "the load's log line arrives")
    shot(browser, "logs")
    Select(browser.find_element(By.ID, "log-level")).select_by_value("warning")
    until(browser, lambda d: "loaded tiny in" not in d.find_element(By.ID, "log-lines").text,
          "info lines are filtered out at level warning")
    assert (server.log_path.parent / "home" / "logs" / "server.log").read_text().count("loaded tiny in") >= 1


def test_download_from_the_hub(server, browser, model_dir):
    browser.get(server.root + "/admin#downloader")
    browser.find_element(By.ID, "hf-query").send_keys("tiny-hub")
    browser.find_element(By.CSS_SELECTOR, "#hf-search-form button").click()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#hf-results button[data-repo="test-org/tiny-hub-model"]'),
          "the search finds the repo")
    browser.find_element(By.CSS_SELECTOR, '#hf-results button[data-repo="test-org/tiny-hub-model"]').click()
    until(browser, lambda d: "model.safetensors" in d.find_element(By.ID, "hf-files").text, "its files are listed")
    browser.find_element(By.ID, "hf-download").click()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.task[data-status="done"]'), "the download completes")
    task = browser.find_element(By.CSS_SELECTOR, '.task[data-status="done"]')
    assert "test-org/tiny-hub-model" in task.text
    # One model dir: nothing to choose (the choice shows with several; the API test covers it).
    assert not browser.find_element(By.ID, "hf-model-dir-label").is_displayed()
    assert browser.find_element(By.ID, "hf-model-dir").get_attribute("value") == str(model_dir)
    assert task.find_element(By.CSS_SELECTOR, ".bar > div").get_attribute("style").replace(" ", "") == "width:100%;"
    assert (model_dir / "test-org" / "tiny-hub-model" / "model.safetensors").is_file()
    shot(browser, "downloader")
    browser.get(server.root + "/admin#models")
    until(browser, lambda d: model_row(d, "test-org/tiny-hub-model"), "the downloaded model is served")


def test_status_page_counts_the_traffic(server, browser):
    browser.get(server.root + "/admin#status")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#status-models .card[data-model-id="tiny"]'),
          "the loaded model's card shows")
    card = browser.find_element(By.CSS_SELECTOR, '#status-models .card[data-model-id="tiny"]').text
    assert "running / waiting" in card and "KV pool" in card and "prefix-cache hit rate" in card
    assert "prompts in prefill" not in card  # nothing is being prefilled now
    # The row a card shows while prompts are prefilled (from /admin/api/stats' `prefilling`).
    progress = browser.execute_script(
        "return prefillProgress([{done: 1024, total: 4567}, {done: 0, total: 100}], 100)")
    assert progress == "2 prompts: 1,024 / 4,667 tokens, ~37 s left"
    row = browser.find_element(By.CSS_SELECTOR, '#totals-table tr[data-scope="session"][data-model="tiny"]')
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == "1"  # the one chat with tiny
    assert int(cells[6]) > 1  # its generated tokens
    latency = browser.find_element(By.ID, "status-latency").text
    assert "tiny" in latency and "ms" in latency
    shot(browser, "status")
