"""One small client for chat LLMs: Gemini (google-genai SDK) and any OpenAI-compatible endpoint.

`make_client(provider, model, base_url=None)` returns an `LLMClient` whose
`complete(prompt, *, system=None, temperature, max_tokens) -> str` retries what is worth retrying:

* HTTP 429, 5xx, timeouts and transport faults (a refused, reset or dropped connection, a body
  shorter than its Content-Length, a garbled response: `OSError`, `http.client.HTTPException`,
  the SDK's httpx/httpx2 `TransportError`): exponential backoff with full jitter
  (`base_delay * 2**attempt`, capped at `max_delay`), or the server's `Retry-After` when it sends
  one, up to `max_attempts` calls;
* malformed answers (not JSON, no text, empty text, blocked): re-asked up to `malformed_attempts`;
* anything else (401/403, other 4xx, a malformed base URL) fails at once.

Failures raise typed errors (`AuthError`, `RateLimitError`, `ServerError`, `LLMTimeout`,
`TransportError`, `MalformedResponse`, `RequestError`, all `LLMError`); no other exception leaves
`complete()`. Keys come from the environment (`GEMINI_API_KEY` or `GOOGLE_API_KEY`;
`OPENAI_API_KEY`) or the `api_key` argument; they are never put in a message, log line or repr:
every text taken from a server or an exception passes through `_redact` before it is cut or
logged (the key, in the forms a server may echo it, is replaced in the whole text; then the text is
cut; then any 8+ character piece of the key left, from a server that cut or masked the key itself,
is replaced too), and errors are raised `from None` so no underlying exception (which might quote
a request) is chained.
"""

from __future__ import annotations

import email.utils
import http.client
import importlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
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
    """Still timing out after all retries."""


class TransportError(LLMError):
    """Still losing the connection after all retries (reset, closed early, a short body)."""


class MalformedResponse(LLMError):
    """The answer had no usable text, after re-asking."""


class RequestError(LLMError):
    """The server refused the request (a 4xx other than 401/403/429): not retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try."""

    max_attempts: int = 6  # calls per complete() for 429 / 5xx / timeouts / transport faults
    malformed_attempts: int = 3  # calls per complete() for malformed answers
    base_delay: float = 1.0  # seconds; doubled per retry, full jitter
    max_delay: float = 60.0  # cap on one wait, Retry-After included
    timeout: float = 120.0  # seconds per HTTP call


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


_FINAL = {"rate_limit": RateLimitError, "server": ServerError, "timeout": LLMTimeout}
_FINAL |= {"transport": TransportError, "malformed": MalformedResponse}

_BODY_LIMIT = 1 << 20  # bytes of a body read for a message: far past any cut, so no key crosses it
_FRAGMENT = 8  # shortest piece of a key that counts as a leak


def _key_forms(secret: str) -> list[str]:
    """The key as a server may echo it: raw, URL-encoded, JSON-escaped (with or without `\\/`)."""
    js = json.dumps(secret)[1:-1]
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret), js}
    forms.add(js.replace("/", "\\/"))
    return sorted(forms, key=len, reverse=True)


def _drop_fragments(text: str, secret: str) -> str:
    """`text` with each run of `_FRAGMENT`+ characters that also occurs in `secret` replaced."""
    out, i = [], 0
    while i < len(text):
        n = _FRAGMENT
        if i + n <= len(text) and text[i : i + n] in secret:
            while i + n < len(text) and text[i : i + n + 1] in secret:
                n += 1
            out.append("***")
            i += n
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _redact(text: object, secret: str | None, limit: int = 500) -> str:
    """`text` without `secret`, cut to `limit` characters.

    The key is replaced in the whole text first (a key across the cut would otherwise keep its
    prefix), in every form `_key_forms` knows (case-insensitively, for `%2f` against `%2F`); the
    cut comes next; last, any piece of the key of `_FRAGMENT`+ characters still there (a server
    that cut or masked the key itself) goes too.
    """
    text = str(text)
    if not secret:
        return text[:limit]
    pattern = "|".join(re.escape(f) for f in _key_forms(secret))
    text = re.sub(pattern, "***", text, flags=re.IGNORECASE)[:limit]
    return _drop_fragments(text, secret)


def _transport_kind(e: BaseException) -> str | None:
    """'timeout' or 'transport' for a failure of the connection (worth retrying); None otherwise.

    `http.client.HTTPException` covers a body shorter than its Content-Length (`IncompleteRead`),
    `RemoteDisconnected` and garbled status lines; `OSError` covers resets, refusals and
    `urllib.error.URLError` (whose `reason` says whether it was a timeout).
    """
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):  # "unknown url type": a mistake, not a fault
            return None
        e = e.reason
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, OSError | http.client.HTTPException):
        return "transport"
    return None


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
        body: dict[str, object] = {"model": self.model, "messages": messages}
        body |= {"temperature": temperature, "max_tokens": max_tokens}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        try:
            req = urllib.request.Request(
                f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers, "POST"
            )
            with urllib.request.urlopen(req, timeout=self.retry.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = _redact(self._error_body(e), self._key, 300)
            raise _status_error(e.code, text, e.headers.get("Retry-After")) from None
        except (ValueError, http.client.InvalidURL) as e:  # a bad base URL or header: not retried
            raise RequestError(f"bad request ({type(e).__name__}: {e})") from None
        except Exception as e:
            if kind := _transport_kind(e):
                raise _Retryable(kind, f"{type(e).__name__}: {e}") from None
            if isinstance(e, urllib.error.URLError):
                raise RequestError(f"bad request ({e})") from None
            raise LLMError(f"openai {self.model}: {type(e).__name__}: {e}") from None
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            shown = _redact(raw.decode("utf-8", "replace"), self._key, 120)
            raise _Retryable("malformed", f"unexpected answer {shown!r}") from None
        if not isinstance(text, str):
            raise _Retryable("malformed", "answer content is not text")
        return text

    @staticmethod
    def _error_body(e: urllib.error.HTTPError) -> str:
        """The error's body (up to `_BODY_LIMIT` bytes); a body lost in transit is only noted:
        the status code, not the body, decides what happens next."""
        try:
            return e.read(_BODY_LIMIT).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as err:
            return f"(body lost: {type(err).__name__})"


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
        except Exception as e:
            raise _sdk_error(e) from None
        try:
            return resp.text or ""
        except (ValueError, AttributeError):
            return ""


def _httpx_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(timeouts, other transport faults, mistakes in the request) of the httpx the SDK runs on.

    google-genai uses `httpx`, or its fork `httpx2` (same classes, another module) when that is
    the one installed; both are covered. A wrong URL scheme or an unsendable header is the user's
    to fix, so it is not retried even though httpx files it under `TransportError`.
    """
    timeouts, transport, refused = [], [], []
    for name in ("httpx", "httpx2"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        timeouts.append(mod.TimeoutException)
        transport += [mod.TransportError, mod.DecodingError]
        refused += [mod.UnsupportedProtocol, mod.LocalProtocolError, mod.InvalidURL]
    return tuple(timeouts), tuple(transport), tuple(refused)


def _sdk_error(e: Exception) -> Exception:
    """The exception for a non-HTTP failure inside the google-genai SDK."""
    timeouts, transport, refused = _httpx_errors()
    name = type(e).__name__
    if isinstance(e, refused):
        return RequestError(f"bad request ({name}: {e})")
    if isinstance(e, timeouts):
        return _Retryable("timeout", f"{name}: {e}")
    if isinstance(e, transport):
        return _Retryable("transport", f"{name}: {e}")
    if kind := _transport_kind(e):
        return _Retryable(kind, f"{name}: {e}")
    if isinstance(e, ValueError | KeyError | TypeError):  # an unparsable answer
        return _Retryable("malformed", name)
    return LLMError(f"gemini: {name}: {e}")


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
