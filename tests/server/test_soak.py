"""Short soaks of a real `chat-cli serve`: 16 concurrent clients, a quarter of them disconnecting before their
first token (mostly while queued), mid-stream or while waiting for a whole answer (tests/soak/soak_server.py:
the clients and checks; run it for 64 clients and hundreds of requests on SmolLM2)."""

from __future__ import annotations

from soak.soak_server import run_soak, soak_server

REQUESTS = 60


def test_misbehaving_clients_leave_nothing_behind_and_the_others_get_their_answers_alone(tiny_chat_model, tmp_path):
    # Four sequences at a time: most of the 16 clients' requests wait in the queue, where some of them leave.
    with soak_server(tiny_chat_model, str(tmp_path), "--max-num-seqs", "4", "--kv-cache-memory", "0.001") as server:
        report = run_soak(server.url, server.process.pid, clients=16, requests=REQUESTS, distinct=16, max_tokens=32, seed=5)
        log = server.log()
    print(report.figures())
    assert not report.errors, report.errors[:5]
    assert not report.mismatches, report.mismatches[:5]  # every completed answer is the one it gets alone
    assert report.requests == REQUESTS
    assert report.kinds["n>1"] > 0 and report.kinds["a stop string"] > 0
    assert report.disconnects >= REQUESTS // 8
    assert len([o for o in report.outcomes if o.startswith("disconnected")]) >= 2  # at different points
    assert sum(n for o, n in report.outcomes.items() if o.startswith("completed")) >= REQUESTS // 2
    assert report.sequences_left == (0, 0) and report.kv_blocks_held == 0  # nothing running, every block free
    assert abs(report.memory_drift) < 0.05, report.figures()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_default_model_soak_with_batch_invariance_answers_exactly_as_alone(smollm2_path, tmp_path):
    # The default model as users run it (Q4 weights kept 4-bit), made batch-invariant: every completed
    # answer must be the very one it gets alone, whatever it was batched with.
    # At this size, without --batch-invariant, 3 answers differed from alone (in a trial run).
    args = ("--max-num-seqs", "8", "--kv-cache-memory", "0.05", "--batch-invariant")
    with soak_server(smollm2_path, str(tmp_path), *args) as server:
        report = run_soak(server.url, server.process.pid, clients=16, requests=32, distinct=16, max_tokens=24, seed=7)
        log = server.log()
    print(report.figures())
    assert not report.errors, report.errors[:5]
    assert not report.mismatches, report.mismatches[:5]
    assert report.requests == 32 and report.disconnects > 0
    assert report.sequences_left == (0, 0) and report.kv_blocks_held == 0
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
