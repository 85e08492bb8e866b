"""The web chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright): type a message, see
the answer stream in token by token, stop it mid-answer (the server frees the slot), reset, sampling settings
reach the server. `./run test` installs Playwright (pip) and Debian's chromium (apt); without a Chromium binary the
test fails, saying how to install it. The screenshot goes to
$LLAMA2_TEST_ARTIFACTS (if set) or the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import playwright.sync_api as sync_api  # noqa: E402

import httpx  # noqa: E402

from helpers import SERVE_NAME as NAME, serve_model, slowed, start_server as start  # noqa: E402

CHROMIUM = os.environ.get("LLAMA2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_a_chromium_binary_is_installed():
    assert CHROMIUM is not None, ("no chromium binary: `apt-get install chromium` (./run test does it), or set "
                                  "LLAMA2_CHROMIUM to one")


@pytest.fixture(scope="module")
def model():
    return serve_model()


@pytest.fixture(scope="module")
def page_server(model, tok):
    s = slowed(start(model, tok, api_key=None), 0.03)  # ~30 ms a token: streaming is visible, stop lands mid-way
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def test_chat_page_streams_stops_and_resets(page_server, browser, tmp_path):
    page = browser.new_page()
    requests: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and requests.append(r.post_data_json))
    page.goto(page_server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_value(NAME)
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "20")

    # a streamed answer: its text grows over several reads, and it finishes
    page.fill("#input", "Name a colour.")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    lengths = []
    deadline = time.monotonic() + 30
    while answer.get_attribute("data-state") == "streaming" and time.monotonic() < deadline:
        lengths.append(len(answer.locator(".body").text_content()))
        time.sleep(0.05)
    assert answer.get_attribute("data-state") == "done"
    grew = sorted(set(lengths))
    assert len(grew) >= 3, lengths  # token by token, not all at once
    assert int(answer.get_attribute("data-pieces")) >= 3
    first = answer.locator(".body").text_content()
    assert requests[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert requests[-1]["temperature"] == 0 and requests[-1]["max_tokens"] == 20 and requests[-1]["stream"]

    # stop mid-answer: the page marks it stopped and the server frees the slot
    page.fill("#input", "And another?")
    page.click("#send")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.pieces >= 3", timeout=30_000)
    assert health(page_server)["busy_slots"] == 1
    page.click("#stop")
    sync_api.expect(second).to_have_attribute("data-state", "stopped")
    stopped_at = len(second.locator(".body").text_content())
    deadline = time.monotonic() + 5
    while health(page_server)["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(page_server)["busy_slots"] == 0
    time.sleep(0.3)
    assert len(second.locator(".body").text_content()) == stopped_at  # nothing more arrived
    # the history sent next includes the first answer and the stopped one
    page.fill("#max_tokens", "3")
    page.fill("#input", "Third?")
    page.click("#send")
    sync_api.expect(page.locator(".msg.assistant").nth(2)).to_have_attribute("data-state", "done", timeout=30_000)
    sent = requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent[2]["content"] == first

    shot = Path(os.environ.get("LLAMA2_TEST_ARTIFACTS") or tmp_path) / "serve_chat_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000

    # reset: the conversation is gone, and the next request carries no history
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Fresh start")
    page.click("#send")
    sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=30_000)
    assert [m["role"] for m in requests[-1]["messages"]] == ["system", "user"]
    page.close()


def test_chat_page_shows_server_errors(page_server, browser):
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.fill("#input", "hi [INST] there")
    page.click("#send")
    msg = page.locator(".msg.assistant").last
    sync_api.expect(msg).to_have_attribute("data-state", "error")
    assert "[INST]" in msg.text_content()
    page.close()


def test_chat_page_fits_the_model_context(page_server, browser):
    """The page's defaults fit the context (no max_tokens sent: the server's default, cut to what the prompt
    leaves), and a conversation longer than the context drops its oldest exchanges, marked on the page, as
    `llama2 chat` does, instead of failing."""
    page = browser.new_page()
    requests: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and requests.append(r.post_data_json))
    page.goto(page_server.url + "/")
    page.fill("#temperature", "0")
    for i in range(6):  # ~40 tokens a question: the 128-token context holds about two exchanges
        page.fill("#input", f"Question {i}: " + "tell me more about that please " * 5)
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant").nth(i)).to_have_attribute("data-state", "done",
                                                                                timeout=30_000)
    assert "max_tokens" not in requests[0]
    assert page.locator(".msg.error").count() == 0
    dropped = page.locator(".msg.dropped").count()
    assert dropped >= 4 and dropped % 2 == 0
    last = requests[-1]["messages"]
    assert last[-1]["content"].startswith("Question 5:") and len(last) == 2 * 5 - dropped + 1
    page.close()
