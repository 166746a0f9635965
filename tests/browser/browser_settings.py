"""Where the browser tests find Chromium, how they start it, and what they share with the server they test."""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("CHAT_TEST_CHROMIUM", "/usr/bin/chromium")  # Debian's `chromium` package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "the browser tests need Chromium: `apt-get install -y chromium` (Debian/Ubuntu; CI's .ci/run does it), "
    "or point CHAT_TEST_CHROMIUM at a Chromium binary"
)
API_KEY = "browser-test-key"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")  # tests/artifacts
