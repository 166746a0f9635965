"""The chat page in a real browser: headless Chromium (the system's, never a downloaded one) driven by
Playwright's Python client, against a real `chat-cli serve` with the default model on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "server"))  # the server helpers of tests/server

from browser_settings import API_KEY, CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT  # noqa: E402
from server_process import ServerProcess, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: {INSTALL_HINT}", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("pip install playwright (its Python client; the tests use the system's Chromium)", pytrace=False)
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile (user-data-dir), removed when it closes.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """`chat-cli serve` with the default model, an API key, and a runner that answers 'xyzzy' prompts with a script."""
    server = start_server(
        "--api-key", API_KEY,
        "--model-runner-cls", "scripted_runner:ScriptedReplyRunner",
        "--max-model-len", "2048",
        log_dir=str(tmp_path_factory.mktemp("serve-logs")),
        env={"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])},
        api_key=API_KEY,
    )  # fmt: skip
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture
def new_page(browser, chat_server):
    """new_page(**context_options): a page in a context of its own (no stored key); fails the test on page errors."""
    contexts, errors = [], []

    def make(**options):
        context = browser.new_context(viewport={"width": 960, "height": 720}, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(180_000)  # a busy 2-core machine decodes a few tokens a second
        page.on("pageerror", lambda error: errors.append(error))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"the page threw: {errors}"
