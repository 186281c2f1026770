"""A fake LLM server for tests: OpenAI `/chat/completions` and Gemini `:generateContent`.

It writes a plausible Arabic story that uses the three quoted words of the prompt (in inflected
forms), made of random pseudo-words so stories are not near-duplicates of each other, and fails a
chosen share of calls: HTTP 429 (with Retry-After, 0 s unless told), HTTP 500, a malformed body,
a timeout (it sleeps past the client's timeout), a story that breaks the rules (English), or a
duplicate of the previous story. Failure draws come from a seeded RNG, so runs are repeatable.
The 429 and 500 bodies echo the request's API key, as a careless proxy might: the client must not
repeat it.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
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
    ):
        self.fail, self.delay, self.hang, self.retry_after = fail or {}, delay, hang, retry_after
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.last_seed = None
        self.keys_seen: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeLLMServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str:
        with self.lock:
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

            def _reply(self, mode: str, story: str, gemini: bool, key: str):
                echo = json.dumps(f"request with {key}")
                if mode == "429":
                    body = f'{{"error": {{"code": 429, "message": {echo}}}}}'.encode()
                    return self._send(429, body, {"Retry-After": srv.retry_after})
                if mode == "500":
                    body = f'{{"error": {{"code": 500, "message": {echo}}}}}'.encode()
                    return self._send(500, body)
                if mode == "malformed":
                    return self._send(200, b'{"choices": [], "candidates": "nope"')
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
                self._send(200, json.dumps(out, ensure_ascii=False).encode())

        return Handler
