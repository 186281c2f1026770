"""The LLM client against a local fake server: retries, Retry-After, typed errors, no key leaks,
transport faults (short bodies, resets, dropped connections) on both protocols and through the
`jaxlm synthesize` and `jaxlm judge grade` commands."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from helpers_llm_server import FakeLLMServer

from jaxlm.llm import (
    AuthError,
    LLMError,
    MalformedResponse,
    RateLimitError,
    RequestError,
    RetryPolicy,
    ServerError,
    TransportError,
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


# ---------------------------------------------------------------- keys across every cut

# "/", "+" and "=" make the URL-encoded and the JSON-escaped forms differ from the raw key
LEAKY = "sk-live/Leak+Key=0123456789abcdefghijKLMNOPqrstuv"
CUTS = (120, 300, 500)  # malformed answers, HTTP error bodies, messages


def _leaks(text: str, key: str = LEAKY) -> list[str]:
    """The 8-character pieces of `key` found in `text`."""
    return [key[i : i + 8] for i in range(len(key) - 7) if key[i : i + 8] in text]


def _straddles(key_len: int, step: int) -> list[int]:
    """Body offsets that put the key across each cut, for every way the client frames the body
    (the Gemini path quotes the error's message field, 36 bytes into the body; messages get a
    ~10-character 'HTTP 429: ' head)."""
    spots = set()
    for cut in CUTS:
        spots |= set(range(max(40, cut - key_len - 12), cut + 40, step))
    return sorted(spots)


@pytest.mark.parametrize(("provider", "step"), [("openai", 2), ("gemini", 5)])  # the SDK is slower
@pytest.mark.parametrize(
    ("mode", "form"), [("429", "raw"), ("malformed", "raw"), ("500", "url"), ("429", "json_slash")]
)
def test_no_piece_of_the_key_leaks_across_any_cut(provider, step, mode, form, caplog, capsys):
    """The server echoes the key (raw, URL-encoded or JSON-escaped) at offsets all around the
    cuts; after each failed call (one retry, so a log line too) neither the error, nor a log record
    (DEBUG, every logger), nor anything printed holds 8 characters of it."""
    retry = dataclasses.replace(FAST, max_attempts=2, malformed_attempts=2)
    spots = _straddles(len(LEAKY), step)
    with FakeLLMServer(fail={mode: 1.0}, echo_form=form) as srv, caplog.at_level("DEBUG"):
        client = _client(srv, provider, key=LEAKY, retry=retry)
        for at in spots:
            srv.echo_at = at
            with pytest.raises(LLMError) as info:
                client.complete(PROMPT)
            text = f"{info.value} {info.value!r} {info.value.args}"
            assert not _leaks(text), (at, text)
    out = capsys.readouterr()
    assert srv.keys_seen == {LEAKY} and client.stats["calls"] == 2 * len(spots)
    assert not _leaks(caplog.text + out.out + out.err + repr(client))
    assert caplog.text.count("retrying") >= len(spots)


def test_redact_unit_cases():
    from jaxlm.llm import _redact

    text = "x" * 480 + f" header {LEAKY}"  # the key starts at 488 and crosses the cut at 500
    assert not _leaks(_redact(text, LEAKY)) and len(_redact(text, LEAKY)) <= 500
    # a server that cut or masked the key itself leaves pieces of it: pieces of 8+ go too
    masked = f"Incorrect API key provided: {LEAKY[:12]}****{LEAKY[-9:]}"
    assert _redact(masked, LEAKY) == "Incorrect API key provided: ***" + "****" + "***"
    assert not _leaks(_redact(f"u={LEAKY.replace('/', '%2f')}", LEAKY))  # lower-case escapes
    assert _redact("nothing secret here", LEAKY) == "nothing secret here"


# ---------------------------------------------------------------- transport faults

FAULTS = ["short", "reset", "disconnect", "short_500"]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_transport_faults_are_retried_then_succeed(provider, caplog):
    with FakeLLMServer(script=FAULTS) as srv, caplog.at_level("INFO"):
        client = _client(srv, provider, retry=dataclasses.replace(FAST, max_attempts=5))
        assert "كرة" in client.complete(PROMPT)
    assert client.stats["calls"] == 5 and srv.counts["ok"] == 1
    assert client.stats["transport"] + client.stats["server"] == 4  # a short 5xx is still a 5xx
    assert {k for k in srv.counts} == {*FAULTS, "ok"}
    assert KEY not in caplog.text


@pytest.mark.parametrize("provider", ["openai", "gemini"])
@pytest.mark.parametrize("mode", ["short", "reset", "disconnect"])
def test_transport_faults_that_never_end_raise_transport_error(provider, mode):
    sleeps = []
    with FakeLLMServer(fail={mode: 1.0}) as srv:
        client = _client(srv, provider, sleeps=sleeps)
        with pytest.raises(TransportError) as info:
            client.complete(PROMPT)
    assert client.stats["calls"] == FAST.max_attempts == client.stats["transport"]
    assert len(sleeps) == FAST.max_attempts - 1 and all(0 < s <= FAST.max_delay for s in sleeps)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert KEY not in str(info.value)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_bad_base_url_is_a_request_error(provider):
    for url in ("nope://127.0.0.1:9", "127.0.0.1:9/v1", "http://127.0.0.1:port/v1"):
        client = make_client(provider, "m", url, api_key=KEY, retry=FAST)
        with pytest.raises(RequestError):
            client.complete(PROMPT)
        assert client.stats["calls"] == 1


def _cli(args: list[str], env_key: str, key: str = LEAKY) -> subprocess.CompletedProcess:
    env = {**os.environ, env_key: key}
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _one_error_line(stderr: str) -> str:
    """The stderr's single error line (a progress bar may precede it), checked for no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.replace("\r", "\n").splitlines() if "error:" in ln]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_synthesize_gives_up_on_a_dead_transport_with_one_line(tmp_path, provider):
    out = tmp_path / "stories.jsonl"
    with FakeLLMServer(fail={"short": 0.5, "reset": 0.5}, echo_at=200) as srv:
        url = srv.url + "/v1" if provider == "openai" else srv.url
        args = ["synthesize", "--n", "1", "--out", str(out), "--provider", provider]
        args += ["--model", "m", "--base-url", url, "--concurrency", "4", "--max-attempts", "2"]
        args += ["--base-delay", "0.001", "--timeout", "5"]
        r = _cli(args, "OPENAI_API_KEY" if provider == "openai" else "GEMINI_API_KEY")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "jaxlm synthesize: error: gave up after 103 prompts" in line
    assert "TransportError" in line and srv.counts["ok"] == 0
    assert not _leaks(r.stdout + r.stderr) and srv.keys_seen == {LEAKY}


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_judge_grade_on_a_dead_transport_counts_failures(tmp_path, provider):
    inputs, out = tmp_path / "in.jsonl", tmp_path / "grades.jsonl"
    rows = [{"id": f"s{i}", "prompt": "كان يا ما كان", "completion": "قطة."} for i in range(3)]
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    with FakeLLMServer(fail={"short": 0.4, "reset": 0.3, "disconnect": 0.3}) as srv:
        url = srv.url + "/v1" if provider == "openai" else srv.url
        args = ["judge", "grade", "--inputs", str(inputs), "--out", str(out)]
        args += ["--provider", provider, "--model", "m", "--base-url", url, "--timeout", "5"]
        args += ["--max-attempts", "2", "--base-delay", "0.001", "--concurrency", "2"]
        r = _cli(args, "OPENAI_API_KEY" if provider == "openai" else "GEMINI_API_KEY")
    assert "Traceback" not in r.stderr and not _leaks(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr  # judge's design: failures are counted, a rerun retries
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["failures"] == {"TransportError": 3} and summary["graded_total"] == 0
