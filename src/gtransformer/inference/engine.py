"""`Engine`: continuous batching for a server, many independent requests decoded together by one thread.

    submit(prompt_ids, sampling) ─► queue (FIFO, at most max_queue waiting) ─► a free slot (at most max_batch)
      ─► prefill alone: `Decoder.prefill` into the slot's own cache row ─► first token; joins the next step
    batched step: one token per active slot, each row at its own cache slot and RoPE position
      (`Decoder.rows`), through `Decoder.step`, the same step as `generate.generate`'s (with
      options.compile the batch is padded to a power of two, each size compiled once at start)
      ─► each request samples its own token (its SamplingConfig: a `SamplingState` of one row)
      ─► EngineEvent on its EngineRequest (TextStream pieces, logprobs) ─► finished or cancelled: slot freed

Slots are rows 0..n-1 of one KVCache (max_batch rows x context_length slots): a freed row is refilled
by moving the last active row into it, so every step reads the first n rows as one view. Batching does
not change results: each row attends only to its own keys (row b sees slots [0, next_slots[b]]), so with
greedy sampling a request yields what `generate.generate` yields for its prompt alone.

Threads: the model runs only in the engine's background thread. Callers submit, cancel and read events
from any thread (`for event in request`) or from asyncio (`async for event in request`): nothing here
blocks an event loop. Logprobs are those of the model's distribution (log-softmax of the raw logits,
before repetition penalty, temperature and top-k/top-p), as OpenAI reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gtransformer.errors import UserError
from gtransformer.inference.decode import DecodeOptions, Decoder
from gtransformer.inference.generate import check_prompts, for_tokenizer
from gtransformer.inference.sampling import SamplingConfig, SamplingState
from gtransformer.inference.stream import TextStream
from gtransformer.model.attention import KVCache

log = logging.getLogger(__name__)


class QueueFull(UserError):
    """max_queue requests already wait for a slot."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None  # seconds from submit to the first token (None: no token)
    total_time: float  # seconds from submit to the end


@dataclass(frozen=True)
class EngineEvent:
    """One generated token, or (finish_reason set) the end of a request."""

    token_id: int | None = None  # None on the final event
    text: str = ""  # the text this token completes (may be empty: a split UTF-8 character, a possible stop string)
    logprob: float | None = None  # the chosen token's log-probability (when logprobs > 0 was asked)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the N most likely (token id, log-probability)
    step: int = 0  # how many batched steps the engine had run when this token was produced
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the final event
    usage: Usage | None = None  # on the final event
    error: str | None = None  # with finish_reason "error"


class EngineRequest:
    """A submitted request: its events, read from one consumer thread or one asyncio task, and `cancel()`."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig, logprobs: int, wake_engine: Callable[[], None]):
        self.prompt_ids, self.sampling, self.logprobs = prompt_ids, sampling, logprobs
        self.submitted_at = time.perf_counter()
        self.cancelled = self.done = False
        self._wake_engine = wake_engine
        self._events: deque[EngineEvent] = deque()
        self._ready = threading.Condition()
        self._wake_reader: Callable[[], None] | None = None  # set by aiter: wakes the awaiting task

    def cancel(self) -> None:
        """Stop generating: the engine frees the slot at its next step and sends finish_reason "cancelled"."""
        self.cancelled = True
        self._wake_engine()

    def _push(self, event: EngineEvent) -> None:
        """Called by the engine thread."""
        with self._ready:
            self._events.append(event)
            self.done = self.done or event.finish_reason is not None
            self._ready.notify_all()
            wake = self._wake_reader
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the reader's event loop has closed: nobody listens
                wake()

    def events(self, timeout: float | None = None) -> Iterator[EngineEvent]:
        """Block until each event arrives, up to the final one; TimeoutError after `timeout` s without one."""
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"no event from the engine in {timeout} s")
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[EngineEvent]:
        return self.events()
    async def aiter(self) -> AsyncIterator[EngineEvent]:
        """The events, awaited from asyncio: the engine thread wakes this task with call_soon_threadsafe."""
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        with self._ready:
            self._wake_reader = lambda: loop.call_soon_threadsafe(arrived.set)
        while True:
            arrived.clear()  # before looking, so that an event pushed after the look sets it again
            with self._ready:
                event = self._events.popleft() if self._events else None
            if event is None:
                await arrived.wait()
                continue
            yield event
            if event.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self.aiter()

    def result(self, timeout: float | None = None) -> tuple[list[int], str, EngineEvent]:
        """Wait for the end: (token ids, text, final event)."""
        tokens, pieces = [], []
        for event in self.events(timeout):
            if event.token_id is not None:
                tokens.append(event.token_id)
            pieces.append(event.text)
        return tokens, "".join(pieces), event


class _Slot:
    """What the engine thread keeps about one active request: sampling state, text, cache length."""

    def __init__(self, request: EngineRequest, tokenizer, vocab_size: int, device):
        self.request = request
        self.sampler = SamplingState(request.sampling, [request.prompt_ids], vocab_size, device)
        self.text = TextStream(tokenizer, request.sampling.stop_strings)
        self.length = len(request.prompt_ids)  # cache slots written; the next token goes into slot `length`
        self.next_token = self.generated = 0
        self.first_token_at: float | None = None


class Engine:
    """Decodes up to `max_batch` requests together in one background thread; more wait in a FIFO queue.

    options: how logits are computed (`DecodeOptions`: dtype applies to the decoding steps; with compile
    start() compiles the step for every padded batch size before it returns).
    Use as a context manager, or start() and stop(drain=True). Requests submitted before start() wait in
    the queue.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, options: DecodeOptions | None = None, max_queue: int = 64):
        options = options or DecodeOptions()
        options.validate()
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch = {max_batch} must be >= 1 and max_queue = {max_queue} >= 0")
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.max_batch, self.max_queue = max_batch, max_queue
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self._cond = threading.Condition()
        self._queue: deque[EngineRequest] = deque()
        self._state = "new"  # new -> running -> draining | cancelling -> stopped (or failed)
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot] = []  # engine thread only: row i of the cache is slot i's
        self._steps = 0
        self._cache: KVCache | None = None
        self._decoder: Decoder | None = None  # made by start()

    # ------------------------------------------------------------------ callers' side

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig, logprobs: int = 0) -> EngineRequest:
        """Queue a request; its events come on the returned EngineRequest. QueueFull when max_queue wait."""
        sampling = self._checked(list(prompt_ids), sampling, logprobs)
        request = EngineRequest(list(prompt_ids), sampling, logprobs, self._wake)
        with self._cond:
            if self._state not in ("new", "running"):
                raise UserError(f"the engine is {self._state} and takes no new requests; start a new Engine")
            # A request waits only once every slot is taken: free slots count as room in the queue.
            if len(self._queue) >= self.max_queue + max(self.max_batch - len(self._slots), 0):
                raise QueueFull(f"{len(self._queue)} requests already wait (max_queue = {self.max_queue}); "
                                f"retry later or raise max_queue")
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def _checked(self, prompt_ids: list[int], sampling: SamplingConfig, logprobs: int) -> SamplingConfig:
        sampling.validate()
        vocab = self.model.config.vocab_size
        check_prompts(self.model.config, [prompt_ids], sampling.max_new_tokens)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise UserError(f"prompt token ids must lie in [0, {vocab}); encode the prompt with the model's tokenizer")
        if not 0 <= logprobs <= vocab:
            raise UserError(f"logprobs = {logprobs} must lie in [0, {vocab}]")
        return for_tokenizer(self.tokenizer, sampling)  # as `generate.stream` does

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def load(self) -> tuple[int, int]:
        """(requests waiting for a slot, requests being decoded), for metrics; a snapshot, read under the lock."""
        with self._cond:
            return len(self._queue), len(self._slots)

    def start(self) -> Engine:
        with self._cond:
            if self._state != "new":
                raise UserError(f"the engine is {self._state}; an Engine starts once")
            self._state = "running"
        self._decoder = Decoder(self.model, self.options)
        self._cache = self._decoder.cache(self.max_batch, self.model.config.context_length)
        if self.options.compile:
            self._compile()
        self._thread = threading.Thread(target=self._run, name="gtransformer-engine", daemon=True)
        self._thread.start()
        return self

    def _compile(self) -> None:
        """Compile the step for every padded batch size now, so that no request waits for a compilation.

        Runs one step of dummy tokens at slot 0 of the (still free) rows, under the engine thread's
        inference mode; a failure (no C++ compiler, say) is a UserError before anything is served.
        """
        sizes = sorted({self._padded(n) for n in range(1, self.max_batch + 1)})
        log.info("compiling the decoding step for batch sizes %s (once per process)", ", ".join(map(str, sizes)))
        started = time.perf_counter()
        with torch.inference_mode():
            for n in sizes:
                self._decoder.step(torch.zeros(n, dtype=torch.long, device=self.device),
                                   self._decoder.rows(self._cache, 0, n, [0] * n))
        log.info("compiled in %.0f s", time.perf_counter() - started)

    def _padded(self, rows: int) -> int:
        """The compiled batch size that runs `rows` rows: the next power of two, at most max_batch."""
        return min(1 << (rows - 1).bit_length(), self.max_batch)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """drain=True: finish every accepted request (refusing new ones); False: cancel them. Then join."""
        with self._cond:
            if self._state == "new":  # never started: nothing ran, queued requests are cancelled
                self._fail_waiting("cancelled", None)
                self._state = "stopped"
                return
            if self._state == "running":
                self._state = "draining" if drain else "cancelling"
            elif self._state == "draining" and not drain:
                self._state = "cancelling"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:  # an exception in the with-block cancels what is left
        self.stop(drain=exc[0] is None)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                while self._round():
                    pass
        except Exception as exc:  # report it on every request instead of hanging their readers
            log.exception("the engine thread failed")
            with self._cond:
                self._state = "failed"
                self._fail_waiting("error", f"{type(exc).__name__}: {exc}")
        finally:
            self.model.train(was_training)
            with self._cond:
                if self._state != "failed":
                    self._state = "stopped"

    def _fail_waiting(self, reason: str, error: str | None) -> None:
        """End every queued and active request (called with the lock held)."""
        for request in list(self._queue) + [slot.request for slot in self._slots]:
            request._push(EngineEvent(finish_reason=reason, error=error, usage=self._usage(request, None, 0)))
        self._queue.clear()
        self._slots.clear()

    def _round(self) -> bool:
        """Admit waiting requests into free slots (prefilling each), then one batched step. False: stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._slots or self._state != "running")
            if self._state == "cancelling":
                self._fail_waiting("cancelled", None)
                return False
            for request in [r for r in self._queue if r.cancelled]:
                self._queue.remove(request)
                request._push(EngineEvent(finish_reason="cancelled", usage=self._usage(request, None, 0)))
            admitted = []
            while self._queue and len(self._slots) + len(admitted) < self.max_batch:
                admitted.append(self._queue.popleft())
            if not admitted and not self._slots:
                return self._state == "running"
        self._free([row for row, slot in enumerate(self._slots) if slot.request.cancelled], "cancelled")
        for request in admitted:
            self._prefill(request)
        if self._slots:
            self._batched_step()
        return True

    def _prefill(self, request: EngineRequest) -> None:
        """Run the prompt alone into the next free cache row (`Decoder.prefill`); sample its first token."""
        if request.cancelled or request.sampling.max_new_tokens == 0:
            reason = "cancelled" if request.cancelled else "length"
            return request._push(EngineEvent(finish_reason=reason, usage=self._usage(request, None, 0)))
        row = len(self._slots)
        slot = _Slot(request, self.tokenizer, self.model.config.vocab_size, self.device)
        self._slots.append(slot)
        ids = torch.tensor([request.prompt_ids], device=self.device)
        logits = self._decoder.prefill(ids, self._cache.rows(row, row + 1))
        if not self._take(slot, logits):
            self._free([row])

    def _batched_step(self) -> None:
        """One token for every active slot, each row at its own cache slot."""
        slots = self._slots
        # The compiled step runs padded batch sizes; padding rows are free rows of the cache, whose
        # dummy token lands in their slot 0.
        padding = self._padded(len(slots)) - len(slots) if self.options.compile else 0
        tokens = torch.tensor([slot.next_token for slot in slots] + [0] * padding, device=self.device)
        view = self._decoder.rows(self._cache, 0, len(slots) + padding, [slot.length for slot in slots] + [0] * padding)
        logits = self._decoder.step(tokens, view)[: len(slots)]
        self._steps += 1
        # One op for every greedy row (sample_next's temperature-0 rule, over the tokenizer's ids).
        argmax = logits[:, : self.tokenizer.vocab_size].argmax(-1)
        finished = []
        for row, slot in enumerate(slots):
            slot.length += 1
            chosen = argmax[row : row + 1] if slot.sampler.greedy else None
            if not self._take(slot, logits[row : row + 1], chosen):
                finished.append(row)
        self._free(finished)

    def _take(self, slot: _Slot, logits_1V: torch.Tensor, chosen: torch.Tensor | None = None) -> bool:
        """Pick the slot's next token (unless chosen) and send it; False when the request has finished."""
        request, sampling = slot.request, slot.request.sampling
        token_1 = slot.sampler.next_tokens(logits_1V, chosen)
        token = int(token_1[0])
        if token < 0:  # a stop token
            self._finish(slot, "stop", slot.text.finish())
            return False
        now = time.perf_counter()
        slot.first_token_at = slot.first_token_at or now
        slot.generated += 1
        logprob, top = None, ()
        if request.logprobs:
            logprobs_V = torch.log_softmax(logits_1V[0], dim=-1)
            values, ids = torch.topk(logprobs_V, request.logprobs)
            logprob, top = float(logprobs_V[token]), tuple(zip(ids.tolist(), values.tolist()))
        request._push(EngineEvent(token, slot.text.feed(token), logprob, top, self._steps))
        if slot.text.stopped:
            self._finish(slot, "stop", "")
            return False
        if slot.generated >= sampling.max_new_tokens:
            self._finish(slot, "length", slot.text.finish())
            return False
        slot.sampler.feed(token_1)
        slot.next_token = token
        return True

    def _finish(self, slot: _Slot, reason: str, text: str) -> None:
        usage = self._usage(slot.request, slot.first_token_at, slot.generated)
        slot.request._push(EngineEvent(text=text, step=self._steps, finish_reason=reason, usage=usage))

    @staticmethod
    def _usage(request: EngineRequest, first_token_at: float | None, generated: int) -> Usage:
        start = request.submitted_at
        ttft = None if first_token_at is None else first_token_at - start
        return Usage(len(request.prompt_ids), generated, ttft, time.perf_counter() - start)

    def _free(self, rows: list[int], reason: str | None = None) -> None:
        """Free these slots (ending their requests with `reason` if given): the last active row moves in."""
        for row in sorted(rows, reverse=True):
            slot = self._slots[row]
            if reason is not None:
                self._finish(slot, reason, "")
            last = self._slots.pop()
            if row < len(self._slots):
                n = last.length
                self._cache.k[:, row, :, :n] = self._cache.k[:, len(self._slots), :, :n]
                self._cache.v[:, row, :, :n] = self._cache.v[:, len(self._slots), :, :n]
                self._slots[row] = last
