"""A fake LLM server for tests: OpenAI `/chat/completions` and Gemini `:generateContent`.

It writes a plausible Arabic story that uses the three quoted words of the prompt (in inflected
forms), made of random pseudo-words so stories are not near-duplicates of each other, and fails a
chosen share of calls: HTTP 429 (with Retry-After, 0 s unless told), HTTP 500, a malformed body,
a timeout (it sleeps past the client's timeout), a story that breaks the rules (English), or a
duplicate of the previous story; or a transport fault: a body shorter than its Content-Length
("short", and "short_500" for an error body), a connection reset half way through the body
("reset"), a connection closed before any answer ("disconnect"). Failure draws come from a seeded
RNG, so runs are repeatable; `script` lists the modes of the first calls, in order, before the
draws take over.

The 429 and 500 bodies echo the request's API key, as a careless proxy might: the client must not
repeat it. `echo_at` places the echoed credential (the Authorization value, "Bearer " included, or
the x-goog-api-key) at that byte of the body (429, 500 and malformed bodies), so a test can make
the key straddle any cut the client makes; `echo_form` echoes it raw, URL-encoded ("url") or
JSON-escaped with `\\/` ("json_slash").
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"


def fake_story(prompt: str, rng: random.Random) -> str:
    quoted = re.findall(r'"([^"]+)"', prompt)
    verb, noun, adj = quoted[:3]
    name = quoted[3] if len(quoted) > 3 else "سارة"
    words = ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(90)]
    words[5:5] = [name, "ي" + verb, "مع", "ال" + noun]
    words[40:40] = ["و" + noun + "ها", "ال" + adj]
    sentences = [" ".join(words[i : i + 9]) + "." for i in range(0, len(words), 9)]
    return "\n\n".join(" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3))


class FakeLLMServer:
    """`with FakeLLMServer(fail={"429": 0.1, ...}) as srv:` then use `srv.url`."""

    def __init__(
        self,
        fail: dict | None = None,
        seed: int = 0,
        delay: float = 0.0,
        hang: float = 2.0,
        retry_after: str = "0",
        script: list[str] | None = None,
        echo_at: int | None = None,
        echo_form: str = "raw",
    ):
        self.fail, self.delay, self.hang, self.retry_after = fail or {}, delay, hang, retry_after
        self.script, self.echo_at, self.echo_form = list(script or []), echo_at, echo_form
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.last_seed = None
        self.keys_seen: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeLLMServer:
        # a short poll interval: shutdown() waits up to one interval, once per test
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str:
        with self.lock:
            if self.script:
                return self.script.pop(0)
            x = self.rng.random()
        for mode, share in self.fail.items():
            if x < share:
                return mode
            x -= share
        return "ok"

    def answer(self, prompt: str) -> tuple[str, str]:
        """(mode, story text) for one call."""
        mode = self._draw()
        with self.lock:
            self.counts[mode] += 1
            seed = self.last_seed if mode == "dup" and self.last_seed else self.rng.random()
            self.last_seed = seed
        if mode == "bad_story":
            return mode, "Once upon a time there was a cat. " * 20
        # "dup": the previous story's text around this prompt's words, a near-duplicate
        return mode, fake_story(prompt, random.Random(seed))

    def echo(self, head: str, key: str, tail: str) -> bytes:
        """`head` + filler + the key (in `echo_form`) at byte `echo_at` + `tail`."""
        form = {
            "raw": key,
            "url": urllib.parse.quote(key, safe=""),
            "json_slash": key.replace("/", "\\/"),
        }[self.echo_form]
        if self.echo_at is None:
            return f"{head}request with {form}{tail}".encode()
        assert self.echo_at >= len(head), f"echo_at {self.echo_at} < {len(head)}"
        return f"{head}{'x' * (self.echo_at - len(head))}{form}{tail}".encode()

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Authorization", "") or self.headers.get(
                    "x-goog-api-key", ""
                )
                srv.keys_seen.add(key.removeprefix("Bearer "))
                time.sleep(srv.delay)
                if self.path.endswith("/chat/completions"):
                    prompt = body["messages"][-1]["content"]
                    gemini = False
                elif ":generateContent" in self.path:
                    prompt = body["contents"][0]["parts"][0]["text"]
                    gemini = True
                else:
                    return self._send(404, b"{}")
                mode, story = srv.answer(prompt)
                try:
                    self._reply(mode, story, gemini, key)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _fault(self, code: int, body: bytes, sent: int, reset: bool):
                """Promise `body` but send only its first `sent` bytes, then close (or reset)."""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:sent])
                self.wfile.flush()
                if reset:  # SO_LINGER 0: close() sends a RST instead of a FIN
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()

            def _reply(self, mode: str, story: str, gemini: bool, key: str):
                if mode in ("429", "500", "short_500"):
                    code = 500 if mode == "short_500" else int(mode)
                    head = f'{{"error": {{"code": {code}, "message": "'
                    body = srv.echo(head, key, '"}}')
                    if mode == "short_500":
                        return self._fault(500, body, len(body) // 2, reset=False)
                    return self._send(code, body, {"Retry-After": srv.retry_after})
                if mode == "malformed":
                    if srv.echo_at is None:
                        return self._send(200, b'{"choices": [], "candidates": "nope"')
                    return self._send(200, srv.echo('{"choices": [], "note": "', key, '"'))
                if mode == "disconnect":
                    self.close_connection = True
                    return None
                if mode == "timeout":
                    time.sleep(srv.hang)
                if gemini:
                    out = {
                        "candidates": [
                            {
                                "content": {"role": "model", "parts": [{"text": story}]},
                                "finishReason": "STOP",
                            }
                        ]
                    }
                else:
                    out = {
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": story}}
                        ]
                    }
                body = json.dumps(out, ensure_ascii=False).encode()
                if mode in ("short", "reset"):
                    return self._fault(200, body, len(body) // 2, reset=mode == "reset")
                self._send(200, body)

        return Handler
