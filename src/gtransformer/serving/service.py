"""`CompletionService`: OpenAI completions and chat completions on top of the batching `Engine`.

    body ─► limits (max_tokens cap, context) ─► one Engine request per prompt and choice (n)
         ─► `events`: every request's events merged as they arrive, awaited on the event loop
         ─► one response, or server-sent event chunks (`data: {...}` ... `data: [DONE]`)

A client that goes away (a closed stream, or a disconnect noticed while waiting) cancels
its requests, which frees their decoding slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.requests import Request

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.inference.chat import ChatTemplate
from gtransformer.inference.engine import Engine, EngineEvent, EngineRequest, QueueFull
from gtransformer.inference.generate import prompt_ids
from gtransformer.model.attention import check_context
from gtransformer.serving.metrics import ServerMetrics
from gtransformer.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    now,
    usage,
)

DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    model_name: str
    max_tokens_cap: int = 1024  # the largest max_tokens a request may ask for
    api_key: str | None = None  # bearer token required on /v1/* when set (read from the environment by the CLI)
    max_body_bytes: int = 1 << 20


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Choices:
    """What the choices of one request have produced so far (the non-streamed response)."""

    def __init__(self, count: int):
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.completion_tokens = 0

    @property
    def complete(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


class CompletionService:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, context_length: int, settings: ServerSettings,
                 chat_template: ChatTemplate, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.context_length = engine, tokenizer, context_length
        self.settings, self.chat_template, self.metrics = settings, chat_template, metrics

    # --- shared ---------------------------------------------------------------------------

    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        cap, context = self.settings.max_tokens_cap, self.context_length
        if max_tokens > cap:
            raise APIError(400, f"max_tokens = {max_tokens} is above this server's cap of {cap}", param="max_tokens")
        try:
            check_context(self.engine.model.config, prompt_tokens + max_tokens,
                          f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens})")
        except UserError as exc:
            raise APIError(400, str(exc).replace("max_new_tokens", "max_tokens"),
                           param="max_tokens" if prompt_tokens < context else "prompt",
                           code="context_length_exceeded") from None

    def submit(self, jobs: list[tuple[list[int], object, int]]) -> list[EngineRequest]:
        """All of a body's requests, or none: a refused one cancels those already queued."""
        submitted: list[EngineRequest] = []
        try:
            for ids, sampling, logprobs in jobs:
                submitted.append(self.engine.submit(ids, sampling, logprobs))
        except QueueFull:
            for request in submitted:
                request.cancel()
            raise APIError(429, "too many requests are waiting; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except UserError as exc:
            for request in submitted:
                request.cancel()
            raise APIError(400, str(exc)) from None
        return submitted

    async def events(self, requests: list[EngineRequest], http: Request) -> AsyncIterator[tuple[int, EngineEvent]]:
        """(choice index, event) of all requests as they arrive; a client disconnect cancels them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: EngineRequest) -> None:
            async for event in request:
                await queue.put((index, event))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        remaining = len(requests)
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if event.finish_reason is not None:
                    remaining -= 1
                    if event.usage is not None:
                        self.metrics.finished(event.usage.prompt_tokens, event.usage.completion_tokens,
                                              event.usage.time_to_first_token)
                yield index, event
        finally:
            for request in requests:
                request.cancel()  # a no-op for finished ones
            for task in tasks:
                task.cancel()

    async def collect(self, requests: list[EngineRequest], http: Request, on_token=None) -> Choices:
        choices = Choices(len(requests))
        async for index, event in self.events(requests, http):
            if event.token_id is not None and on_token is not None:
                on_token(index, event, choices)
            choices.texts[index].append(event.text)
            if event.finish_reason:
                choices.reasons[index] = self.finish_reason(event)
                choices.completion_tokens += event.usage.completion_tokens if event.usage else 0
        return choices

    @staticmethod
    def finish_reason(event: EngineEvent) -> str:
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", type="server_error")
        return "length" if event.finish_reason == "length" else "stop"

    def token_logprobs(self, event: EngineEvent) -> tuple[str, float | None, dict[str, float]]:
        top = {self.tokenizer.decode([t]): lp for t, lp in event.top_logprobs}
        return self.tokenizer.decode([event.token_id]), event.logprob, top

    # --- /v1/completions ---------------------------------------------------------------------

    def start_completion(self, body: CompletionRequest) -> tuple[list[EngineRequest], list[str], int]:
        """(requests, the prompt of each choice, prompt tokens of the body)."""
        encoded = [prompt_ids(self.tokenizer, p) for p in body.prompts]
        for ids in encoded:
            self.check_limits(len(ids), body.max_tokens)
        jobs = [(ids, body.sampling(body.max_tokens, seed_offset=i), body.logprobs or 0)
                for ids in encoded for i in range(body.n)]
        choice_prompts = [p for p in body.prompts for _ in range(body.n)]
        return self.submit(jobs), choice_prompts, sum(len(ids) for ids in encoded)

    def completion_chunk(self, rid: str, created: int, index: int, text: str, logprobs, reason) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    async def completion_stream(self, body: CompletionRequest, http: Request) -> AsyncIterator[str]:
        requests, choice_prompts, _ = self.start_completion(body)
        rid, created = new_id("cmpl"), now()

        async def chunks():
            if body.echo:
                for index, prompt in enumerate(choice_prompts):
                    yield sse(self.completion_chunk(rid, created, index, prompt, None, None))
            async for index, event in self.events(requests, http):
                reason = self.finish_reason(event) if event.finish_reason else None
                logprobs = None
                if body.logprobs is not None and event.token_id is not None:
                    token, lp, top = self.token_logprobs(event)
                    logprobs = {"tokens": [token], "token_logprobs": [lp], "top_logprobs": [top]}
                if event.text or reason or logprobs:
                    yield sse(self.completion_chunk(rid, created, index, event.text, logprobs, reason))
            yield "data: [DONE]\n\n"

        return chunks()

    async def completion(self, body: CompletionRequest, http: Request) -> dict | None:
        """The whole response, or None when the client went away first."""
        requests, choice_prompts, prompt_tokens = self.start_completion(body)
        logs = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in requests]

        def record(index: int, event: EngineEvent, choices: Choices) -> None:
            token, lp, top = self.token_logprobs(event)
            offset = len(choice_prompts[index]) * body.echo + len(choices.text(index))
            for key, value in zip(logs[index], (token, lp, top, offset)):
                logs[index][key].append(value)

        choices = await self.collect(requests, http, record if body.logprobs is not None else None)
        if not choices.complete:
            return None
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.settings.model_name,
                "choices": [{"index": i, "text": (choice_prompts[i] if body.echo else "") + choices.text(i),
                             "logprobs": logs[i] if body.logprobs is not None else None,
                             "finish_reason": choices.reasons[i]} for i in range(len(requests))],
                "usage": usage(prompt_tokens, choices.completion_tokens)}

    # --- /v1/chat/completions ----------------------------------------------------------------

    def start_chat(self, body: ChatCompletionRequest) -> tuple[list[EngineRequest], int, dict]:
        """(requests, prompt tokens of the body, the fields every response and chunk carries)."""
        template = self.chat_template
        ids = prompt_ids(self.tokenizer, template.render([(m.role, m.content) for m in body.messages]))
        max_tokens = body.max_tokens or min(self.settings.max_tokens_cap, max(self.context_length - len(ids), 1))
        self.check_limits(len(ids), max_tokens)
        jobs = []
        for i in range(body.n):
            sampling = body.sampling(max_tokens, seed_offset=i)
            jobs.append((ids, replace(sampling, stop_strings=(*sampling.stop_strings, *template.stop)), 0))
        base = {"id": new_id("chatcmpl"), "created": now(), "model": self.settings.model_name,
                "chat_template": template.name}
        return self.submit(jobs), len(ids) * body.n, base

    async def chat_stream(self, body: ChatCompletionRequest, http: Request) -> AsyncIterator[str]:
        requests, _, base = self.start_chat(body)

        def chunk(index: int, delta: dict, reason: str | None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": reason}
            return sse({**base, "object": "chat.completion.chunk", "choices": [choice]})

        async def chunks():
            for index in range(body.n):
                yield chunk(index, {"role": "assistant", "content": ""}, None)
            async for index, event in self.events(requests, http):
                reason = self.finish_reason(event) if event.finish_reason else None
                delta = {"content": event.text} if event.text else {}
                if delta or reason:
                    yield chunk(index, delta, reason)
            yield "data: [DONE]\n\n"

        return chunks()

    async def chat(self, body: ChatCompletionRequest, http: Request) -> dict | None:
        requests, prompt_tokens, base = self.start_chat(body)
        choices = await self.collect(requests, http)
        if not choices.complete:
            return None
        return {**base, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": choices.text(i).strip()},
                             "finish_reason": choices.reasons[i]} for i in range(len(requests))],
                "usage": usage(prompt_tokens, choices.completion_tokens)}
