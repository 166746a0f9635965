"""The chat page that `chat-cli serve` serves at /, used in headless Chromium like a person would use it.

Each test types into the page and reads what it shows; the server behind it is real (SmolLM2, an API
key); what the page sends is read off the wire, what the server did off its /metrics.
"""

from __future__ import annotations

import os
import re
import time

import httpx
from browser_settings import API_KEY, ARTIFACTS
from playwright.sync_api import expect  # pip install playwright: its Python client only, no browser download
from scripted_runner import TRIGGER

expect.set_options(timeout=180_000)  # a busy 2-core machine decodes a few tokens a second

CHAT_COMPLETIONS = "**/v1/chat/completions"
ANSWER = ".message.assistant"
FINISHED_ANSWER = ".message.assistant:not([aria-busy])"


def open_chat(page, server, *, key: str = API_KEY) -> None:
    """Load the page and answer its API-key question."""
    page.goto(server.url + "/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")


def set_settings(page, *, system: str = "", temperature: str = "0", max_tokens: str = "24") -> None:
    if not page.locator("#system-prompt").is_visible():
        page.click("#settings summary")
    page.fill("#system-prompt", system)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def send(page, text: str) -> dict:
    """Type `text`, press Enter; the JSON body the page posted."""
    page.fill("#prompt", text)
    with page.expect_request(CHAT_COMPLETIONS) as request:
        page.press("#prompt", "Enter")
    return request.value.post_data_json


def record_answer_texts(page) -> None:
    """From now on, keep every text the newest answer shows while it streams (read with `answer_texts`)."""
    page.evaluate(
        """() => {
            window.answerTexts = [];
            new MutationObserver(() => {
                const answers = document.querySelectorAll('.message.assistant[aria-busy] .content');
                if (answers.length) window.answerTexts.push(answers[answers.length - 1].innerText);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }"""
    )


def running_sequences(server) -> float:
    return server.metrics()["chat_sequences_running"]


def test_the_page_and_its_files_are_served_without_a_key_and_the_api_stays_where_it_was(chat_server):
    page = httpx.get(chat_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, media_type in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        assert f'"static/{name}"' in page.text
        response = httpx.get(f"{chat_server.url}/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
    for name in ("index.html", "..%2Fserve.py", "missing.js"):  # only the page's own files
        assert httpx.get(f"{chat_server.url}/static/{name}").status_code == 404
    assert httpx.get(f"{chat_server.url}/v1/models").status_code == 401  # the API still needs the key
    models = httpx.get(f"{chat_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.json()["data"][0]["id"] == "smollm2-135m-instruct"


def test_a_wrong_api_key_shows_the_servers_error_and_the_right_one_is_asked_for_once(new_page, chat_server):
    page = new_page()
    open_chat(page, chat_server, key="not-the-key")
    expect(page.locator("#key-error")).to_have_text("the API key is not valid for this server")
    expect(page.locator("#key-dialog")).to_be_visible()  # asked again, with the reason
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#model")).to_have_text("smollm2-135m-instruct")
    expect(page.locator("#key-dialog")).to_be_hidden()
    page.reload()  # the key is kept: no second question
    expect(page.locator("#model")).to_have_text("smollm2-135m-instruct")
    expect(page.locator("#key-dialog")).to_be_hidden()


def test_answers_stream_in_and_the_second_turn_carries_the_first(new_page, chat_server):
    page = new_page()
    open_chat(page, chat_server)
    expect(page.locator("#model")).to_have_text("smollm2-135m-instruct")
    set_settings(page, system="You are a helpful assistant. Answer in one short sentence.", temperature="0", max_tokens="20")
    record_answer_texts(page)

    first = send(page, "What is the capital of France?")
    assert first["model"] == "smollm2-135m-instruct" and first["stream"] is True
    assert first["temperature"] == 0 and first["max_tokens"] == 20
    assert first["messages"] == [
        {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expect(page.locator(FINISHED_ANSWER)).to_have_count(1)
    shown = page.locator(f"{ANSWER} .content").inner_text()
    assert "Paris" in shown
    partial = [text for text in dict.fromkeys(page.evaluate("window.answerTexts")) if text.strip() and text != shown]
    assert len(partial) >= 2 and all(len(text) < len(shown) for text in partial), partial  # it arrived in pieces
    meta = page.locator(f"{ANSWER} .meta").inner_text()
    assert int(meta.split(" tokens")[0]) <= 20, meta

    second = send(page, "And of Germany?")
    roles = [message["role"] for message in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second["messages"][1]["content"] == "What is the capital of France?"
    assert "Paris" in second["messages"][2]["content"]
    assert second["messages"][3]["content"] == "And of Germany?"
    expect(page.locator(FINISHED_ANSWER)).to_have_count(2)
    assert page.locator(f"{ANSWER} .content").nth(1).inner_text().strip()

    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "chat-page.png")
    page.screenshot(path=screenshot)
    print(f"screenshot of the conversation: {screenshot}")


def test_stop_cancels_the_answer_and_frees_its_slot_and_new_chat_starts_over(new_page, chat_server):
    page = new_page()
    open_chat(page, chat_server)
    set_settings(page, temperature="0", max_tokens="1800")  # ends by the stop, long before 1800 tokens
    aborted_before = chat_server.metrics()['chat_requests_finished_total{finish_reason="abort"}']
    send(page, "Count from 1 to 200, separated by commas.")
    # Mid-answer: a few characters shown (the first event carries only the role and renders an empty
    # paragraph; a lone "1." renders as an empty list item).
    expect(page.locator(f"{ANSWER} .content")).to_have_text(re.compile(r"\S[\s\S]*\S[\s\S]*\S"))
    assert running_sequences(chat_server) == 1
    page.click("#stop")
    expect(page.locator(f"{ANSWER} .meta")).to_have_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 60  # the server notices the closed connection at its next step
    while running_sequences(chat_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running_sequences(chat_server) == 0
    assert chat_server.metrics()['chat_requests_finished_total{finish_reason="abort"}'] == aborted_before + 1
    assert page.locator(f"{ANSWER} .content").inner_text().strip()  # what came before the stop stays

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    set_settings(page, max_tokens="2")
    assert send(page, "Hi")["messages"] == [{"role": "user", "content": "Hi"}]
    expect(page.locator(FINISHED_ANSWER)).to_have_count(1)


def test_html_in_a_reply_is_shown_as_text_and_markdown_is_rendered(new_page, chat_server):
    # The page's own Content-Security-Policy is bypassed: this tests the renderer, not the policy.
    page = new_page(bypass_csp=True)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    open_chat(page, chat_server)
    set_settings(page, max_tokens="200")
    send(page, f"Please say {TRIGGER}.")
    expect(page.locator(FINISHED_ANSWER)).to_have_count(1)
    content = page.locator(f"{ANSWER} .content")
    text = content.inner_text()
    assert "<script>alert(2)</script><img src=x onerror=alert(3)>" in text
    assert "[trap](javascript:alert(4))" in text
    assert content.locator("script, img, iframe, object").count() == 0
    assert content.locator("strong").inner_text() == "Bold"
    assert content.locator("p code").first.inner_text() == "<b>"
    assert content.locator("pre code.language-html").inner_text() == "<script>alert(1)</script>"
    links = content.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/"
    assert links.get_attribute("rel") == "noopener noreferrer nofollow"
    assert content.locator("li").count() == 2
    assert dialogs == [] and page.title() == "chat"  # nothing ran
