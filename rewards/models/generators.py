"""Text generators for the generative judge: the rollout engine, or an OpenAI-compatible HTTP endpoint.

A `TextGenerator` turns prompts into one completion each:

    generate(prompts: list[str]) -> list[str]

`EngineGenerator` adapts any `r1kit.rollout.engine.RolloutEngine` (the built-in torch
engine, the vLLM engine, a worker-process client) plus its tokenizer: prompts
are rendered with the tokenizer's chat template when it has one, tokenised, and
sampled with `SamplingParams` (greedy by default). `OpenAIGenerator` posts each
prompt to `{base_url}/chat/completions` (OpenAI, vLLM's server, SGLang, TGI,
llama.cpp ...) with the standard library's urllib, a few requests at a time,
retrying transient failures (connection errors, HTTP 429 and 5xx).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from r1kit.rollout.engine import RolloutEngine, SamplingParams


@runtime_checkable
class TextGenerator(Protocol):
    """Generates one completion per prompt."""

    def generate(self, prompts: list[str]) -> list[str]: ...


class EngineGenerator:
    """A `TextGenerator` over a `RolloutEngine` and its tokenizer (one sample per prompt)."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        params: SamplingParams | None = None,
        *,
        use_chat_template: bool = True,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params or SamplingParams(n=1, temperature=0.0, max_new_tokens=256)
        if self.params.n != 1:
            raise ValueError(f"EngineGenerator samples one completion per prompt; got SamplingParams.n={self.params.n}")
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None

    def _token_ids(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompts: list[str]) -> list[str]:
        batch = self.engine.generate([self._token_ids(prompt) for prompt in prompts], self.params)
        return list(batch.completion_text)


@dataclass(frozen=True)
class OpenAIGenerator:
    """A `TextGenerator` over an OpenAI-compatible chat-completions endpoint.

    base_url: up to and including the API version, e.g. "http://127.0.0.1:8000/v1".
    model: the model name the server expects.
    api_key_env: environment variable holding the bearer token (unset: no Authorization header).
    timeout_s: per-request timeout; retries: extra attempts on connection errors, 429 and 5xx.
    """

    base_url: str
    model: str
    max_tokens: int = 512
    temperature: float = 0.0
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 2
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIGenerator.base_url must be an http(s) URL, got {self.base_url!r}")
        if self.max_tokens < 1 or self.timeout_s <= 0 or self.retries < 0 or self.max_concurrency < 1:
            raise ValueError(f"OpenAIGenerator: invalid limits in {self}")

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        return urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def complete(self, prompt: str) -> str:
        """The endpoint's reply to one prompt; raises RuntimeError once the retries are spent."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self._request(prompt), timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as error:
                failure = RuntimeError(f"{self.base_url}: HTTP {error.code}: {error.read()[:200]!r}")
                if error.code != 429 and error.code < 500:  # not transient: do not retry
                    raise failure from error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                failure = RuntimeError(f"{self.base_url}: {error}")
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise RuntimeError(f"{self.base_url}: not a chat-completions reply: {error!r}") from error
        raise failure

    def generate(self, prompts: list[str]) -> list[str]:
        if len(prompts) <= 1:
            return [self.complete(prompt) for prompt in prompts]
        with ThreadPoolExecutor(min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self.complete, prompts))
