"""One small client for chat LLMs: Gemini (google-genai SDK) and any OpenAI-compatible endpoint.

`make_client(provider, model, base_url=None)` returns an `LLMClient` whose
`complete(prompt, *, system=None, temperature, max_tokens) -> str` retries what is worth retrying:

* HTTP 429, 5xx, timeouts and dropped connections: exponential backoff with full jitter
  (`base_delay * 2**attempt`, capped at `max_delay`), or the server's `Retry-After` when it sends
  one, up to `max_attempts` calls;
* malformed answers (not JSON, no text, empty text, blocked): re-asked up to `malformed_attempts`;
* anything else (401/403, other 4xx) fails at once.

Failures raise typed errors (`AuthError`, `RateLimitError`, `ServerError`, `LLMTimeout`,
`MalformedResponse`, `RequestError`, all `LLMError`). Keys come from the environment
(`GEMINI_API_KEY` or `GOOGLE_API_KEY`; `OPENAI_API_KEY`) or the `api_key` argument; they are never
put in a message, log line or repr: every error text passes through `_redact`, and errors are
raised `from None` so no underlying exception (which might quote a request) is chained.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """A call that failed for good (after the retries it deserved)."""


class AuthError(LLMError):
    """Missing or rejected API key (401/403)."""


class RateLimitError(LLMError):
    """Still rate limited (429) after all retries."""


class ServerError(LLMError):
    """Still failing with 5xx after all retries."""


class LLMTimeout(LLMError):
    """Still timing out (or dropping the connection) after all retries."""


class MalformedResponse(LLMError):
    """The answer had no usable text, after re-asking."""


class RequestError(LLMError):
    """The server refused the request (a 4xx other than 401/403/429): not retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try."""

    max_attempts: int = 6  # calls per complete() for 429 / 5xx / timeouts
    malformed_attempts: int = 3  # calls per complete() for malformed answers
    base_delay: float = 1.0  # seconds; doubled per retry, full jitter
    max_delay: float = 60.0  # cap on one wait, Retry-After included
    timeout: float = 120.0  # seconds per HTTP call


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


_FINAL = {"rate_limit": RateLimitError, "server": ServerError, "timeout": LLMTimeout}
_FINAL["malformed"] = MalformedResponse


def _redact(text: str, secret: str | None) -> str:
    text = str(text)  # replaced before it is cut: a key across the cut would keep its prefix
    return (text.replace(secret, "***") if secret else text)[:500]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _status_error(status: int, body: str, retry_after: str | None) -> Exception:
    """The exception for an HTTP status: retryable ones as `_Retryable`."""
    if status == 429:
        return _Retryable("rate_limit", f"HTTP 429: {body}", parse_retry_after(retry_after))
    if status >= 500:
        return _Retryable("server", f"HTTP {status}: {body}", parse_retry_after(retry_after))
    if status in (401, 403):
        return AuthError(f"HTTP {status}: the API key was refused")
    return RequestError(f"HTTP {status}: {body}")


class LLMClient:
    """Retrying `complete()` over a provider-specific `_call()`; thread-safe."""

    provider = "base"

    def __init__(
        self,
        model: str,
        api_key: str | None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.model, self.retry, self._sleep = model, retry or RetryPolicy(), sleep
        self._key = api_key
        self._lock = threading.Lock()
        self.stats: Counter = Counter()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"

    def _call(self, prompt: str, system: str | None, temperature: float, max_tokens: int) -> str:
        raise NotImplementedError

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.retry.max_delay, retry_after) + random.uniform(0, 0.1)
        cap = min(self.retry.max_delay, self.retry.base_delay * 2**attempt)
        return random.uniform(0.5 * cap, cap)

    def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        temperature: float = 0.8,
        max_tokens: int = 1024,
    ) -> str:
        """The model's answer to `prompt`; raises an `LLMError` subclass when it gives up."""
        transient = malformed = 0
        while True:
            self._count("calls")
            try:
                text = self._call(prompt, system, temperature, max_tokens)
                if not text or not text.strip():
                    raise _Retryable("malformed", "empty answer")
                return text
            except _Retryable as e:
                self._count(e.kind)
                if e.kind == "malformed":
                    malformed += 1
                    exhausted = malformed >= self.retry.malformed_attempts
                else:
                    transient += 1
                    exhausted = transient >= self.retry.max_attempts
                msg = _redact(e, self._key)
                if exhausted:
                    raise _FINAL[e.kind](f"{self.provider} {self.model}: {msg}") from None
                wait = 0.0 if e.kind == "malformed" else self._delay(transient - 1, e.retry_after)
                log.info("%s: %s; retrying in %.1fs", self.provider, msg, wait)
                self._sleep(wait)
            except LLMError as e:
                raise type(e)(_redact(e, self._key)) from None


class OpenAIClient(LLMClient):
    """`POST {base_url}/chat/completions` (OpenAI, vLLM, Cohere, llama.cpp)."""

    provider = "openai"

    def __init__(self, model: str, api_key: str | None, base_url: str, **kw):
        super().__init__(model, api_key, **kw)
        self.base_url = base_url.rstrip("/")

    def _call(self, prompt: str, system: str | None, temperature: float, max_tokens: int) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        body = {"model": self.model, "messages": messages}
        body |= {"temperature": temperature, "max_tokens": max_tokens}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(
            f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.retry.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read()[:300].decode("utf-8", "replace")
            raise _status_error(e.code, text, e.headers.get("Retry-After")) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
            raise _Retryable("timeout", f"{type(e).__name__}: {e}") from None
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed", f"unexpected answer {raw[:120]!r}") from None
        if not isinstance(text, str):
            raise _Retryable("malformed", "answer content is not text")
        return text


class GeminiClient(LLMClient):
    """`models.generate_content` through the google-genai SDK (its own retries switched off)."""

    provider = "gemini"

    def __init__(self, model: str, api_key: str | None, base_url: str | None = None, **kw):
        super().__init__(model, api_key, **kw)
        from google import genai
        from google.genai import types

        if not api_key:
            raise AuthError("no Gemini key: set GEMINI_API_KEY or GOOGLE_API_KEY")
        opts = types.HttpOptions(
            base_url=base_url,
            timeout=int(self.retry.timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._types = types
        self._client = genai.Client(api_key=api_key, http_options=opts)

    def _call(self, prompt: str, system: str | None, temperature: float, max_tokens: int) -> str:
        from google.genai import errors

        config = self._types.GenerateContentConfig(
            system_instruction=system, temperature=temperature, max_output_tokens=max_tokens
        )
        try:
            resp = self._client.models.generate_content(
                model=self.model, contents=prompt, config=config
            )
        except errors.APIError as e:
            headers = getattr(getattr(e, "response", None), "headers", None) or {}
            raise _status_error(
                int(e.code or 500), str(e.message or e.status), headers.get("retry-after")
            ) from None
        except Exception as e:  # the SDK's transport errors (httpx / aiohttp)
            name = type(e).__name__
            if "Timeout" in name or "Connect" in name or isinstance(e, OSError):
                raise _Retryable("timeout", name) from None
            if isinstance(e, ValueError | KeyError | TypeError):  # unparsable answer
                raise _Retryable("malformed", name) from None
            raise LLMError(f"gemini {self.model}: {name}: {_redact(e, self._key)}") from None
        try:
            return resp.text or ""
        except (ValueError, AttributeError):
            return ""


def make_client(
    provider: str,
    model: str,
    base_url: str | None = None,
    *,
    api_key: str | None = None,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> LLMClient:
    """A client for `provider` ('gemini' or 'openai'); the key defaults to the environment."""
    kw = {"retry": retry, "sleep": sleep}
    if provider == "gemini":
        key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        return GeminiClient(model, key, base_url, **kw)
    if provider == "openai":
        key = api_key or os.environ.get("OPENAI_API_KEY")
        return OpenAIClient(model, key, base_url or "https://api.openai.com/v1", **kw)
    raise ValueError(f"provider {provider!r}: choose 'gemini' or 'openai'")
