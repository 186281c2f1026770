"""The LLM client against a local fake server: retries, Retry-After, typed errors, no key leaks."""

from __future__ import annotations

import dataclasses

import pytest
from helpers_llm_server import FakeLLMServer

from jaxlm.llm import (
    AuthError,
    MalformedResponse,
    RateLimitError,
    RetryPolicy,
    ServerError,
    make_client,
    parse_retry_after,
)

KEY = "sk-test-SECRET-0123456789"
FAST = RetryPolicy(
    max_attempts=4, malformed_attempts=2, base_delay=0.01, max_delay=0.05, timeout=0.5
)
PROMPT = 'اكتب قصة فيها الفعل "لعب" والاسم "كرة" والصفة "كبير".'


def _client(srv, provider="openai", key=KEY, sleeps=None, retry=FAST):
    url = srv.url + "/v1" if provider == "openai" else srv.url
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return make_client(provider, "m", url, api_key=key, retry=retry, sleep=sleep)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_complete_ok(provider):
    with FakeLLMServer() as srv:
        text = _client(srv, provider).complete(PROMPT, system="s", temperature=0.5, max_tokens=64)
    assert "كرة" in text and srv.keys_seen == {KEY}


@pytest.mark.parametrize("provider", ["openai", "gemini"])
@pytest.mark.parametrize(
    ("mode", "error", "calls"),
    [("429", RateLimitError, 4), ("500", ServerError, 4), ("malformed", MalformedResponse, 2)],
)
def test_gives_up_with_typed_error(provider, mode, error, calls, caplog):
    sleeps = []
    with FakeLLMServer(fail={mode: 1.0}, retry_after="2") as srv, caplog.at_level("INFO"):
        # the sleeps are recorded, not slept; exponential backoff would stay under max_delay=5
        retry = dataclasses.replace(FAST, base_delay=0.01, max_delay=5)
        client = _client(srv, provider, sleeps=sleeps, retry=retry)
        with pytest.raises(error) as info:
            client.complete(PROMPT)
    # the server echoed the key in its 429/500 bodies: neither the error nor a log line repeats it
    assert KEY not in str(info.value) and KEY not in repr(client) and KEY not in caplog.text
    assert mode == "malformed" or "***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert client.stats["calls"] == calls
    if mode == "429":  # Retry-After: 2 is honoured instead of the exponential backoff
        assert all(2.0 <= s <= 2.1 for s in sleeps) and len(sleeps) == calls - 1


def test_timeouts_are_retried():
    with FakeLLMServer(fail={"timeout": 0.5}, seed=3, hang=1.0) as srv:
        client = _client(srv)
        for _ in range(4):
            assert client.complete(PROMPT)
    assert client.stats["timeout"] >= 1


def test_bad_key_is_not_retried_nor_leaked():
    import http.server
    import threading

    class Deny(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(f"bad key {self.headers.get('Authorization')}".encode())

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = make_client(
            "openai", "m", f"http://127.0.0.1:{srv.server_address[1]}", api_key=KEY
        )
        with pytest.raises(AuthError) as info:
            client.complete(PROMPT)
    finally:
        srv.shutdown()
    assert client.stats["calls"] == 1 and KEY not in str(info.value)


def test_a_key_across_the_message_cut_is_redacted():
    from jaxlm.llm import _redact

    text = "x" * 480 + f" header {KEY}"  # the key starts at 488 and crosses the cut at 500
    assert KEY[:8] not in _redact(text, KEY) and len(_redact(text, KEY)) <= 500


def test_backoff_and_retry_after_parsing(monkeypatch):
    policy = RetryPolicy(base_delay=1, max_delay=8)
    client = make_client("openai", "m", "http://127.0.0.1:9", api_key=KEY, retry=policy)
    delays = [client._delay(a, None) for a in range(6)]
    assert all(0.5 * min(8, 2**a) <= d <= min(8, 2**a) for a, d in enumerate(delays))
    assert 3 <= client._delay(0, 3.0) <= 3.2 and client._delay(0, 100.0) <= 8.2
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(AuthError, match="GEMINI_API_KEY"):
        make_client("gemini", "m")
