"""A few hundred fuzzed requests against a real `chat-cli serve` on the tiny model, from its own /openapi.json and
beyond it (tests/soak/fuzz_api.py: what is sent and checked; `python tests/soak/fuzz_api.py` runs thousands)."""

from __future__ import annotations

import httpx

from soak.fuzz_api import API_KEY, extreme_requests, fuzz_server, run_fuzz

CASES = 200
SEED = 11  # the same cases on every run; the long version draws a new seed each time


def test_fuzzed_requests_never_get_a_5xx_and_every_error_is_in_openai_format(tiny_chat_model, tmp_path):
    with fuzz_server(tiny_chat_model, str(tmp_path)) as url:
        report = run_fuzz(url, API_KEY, CASES, SEED)
        schema = httpx.get(f"{url}/openapi.json").json()
    assert not report.failures, "\n".join(report.failures[:10])
    assert report.server_errors == 0
    random_cases = {"schema-positive": CASES // 4, "schema-negative": CASES // 4, "beyond-schema": CASES // 2}
    assert report.cases == {**random_cases, "extreme-numbers": len(list(extreme_requests()))}
    # Both accepted and refused requests were among them.
    assert report.statuses[200] > CASES // 10 and report.statuses[400] > CASES // 10
    # The schema the cases came from describes the bodies and this server's limits.
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["messages"]["maxItems"] == 64
    assert schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["required"] is True
