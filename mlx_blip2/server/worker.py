"""The model worker: the one thread that runs the model (MLX calls are not thread-safe).

Jobs that arrive within ``batch_window`` of each other, or that queue up while the worker is busy, and that share a
key (the task and options) run as ONE :meth:`Engine.generate <mlx_blip2.pipelines.engine.Engine.generate>` call
(vision encoder and decode), so concurrent clients raise throughput. Streams run one at a time through
:meth:`Engine.stream`. A job whose client went away or whose time ran out is skipped if it has not started, and a
running decode stops between steps (``should_stop``) once every request in its batch is cancelled.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque

from ..generation.decoding import GenerationCancelled
from ..pipelines.engine import ContextLengthError
from .errors import APIError

log = logging.getLogger("mlx_blip2.server")
_STOP = object()


class Job:
    """One request's work for the model thread. ``key``: jobs with equal keys may share a model call (None: never
    batched); ``rows``: how many model rows it adds to a batch. Streams get their pieces through ``events`` (an
    asyncio queue on ``loop``)."""

    def __init__(self, kind: str, payload: dict, key=None, rows: int = 1, loop=None, events=None):
        self.kind, self.payload, self.key, self.rows = kind, payload, key, rows
        self.loop, self.events = loop, events
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()

    def emit(self, item) -> None:
        if self.loop is None or self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


def generation_key(options, prompted: bool):
    """Requests with equal keys share a model call; a seeded sample is reproducible only on its own (None)."""
    if options.do_sample and options.seed is not None:
        return None
    return ("generate", options, prompted)


class ModelWorker:
    """Owns the model thread: queues jobs, batches compatible ones, runs them and settles their futures."""

    def __init__(self, pipeline, max_batch: int = 8, batch_window: float = 0.01, max_queue: int = 256):
        self.pipeline = pipeline
        self.engine = getattr(pipeline, "engine", None)  # captioning pipelines; retrieval ones have none
        self.max_batch, self.batch_window, self.max_queue = max(1, max_batch), max(0.0, batch_window), max_queue
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._incoming = 0  # requests being read and decoded that will queue a job
        self._lock = threading.Lock()
        self.busy = False
        self.stats = {"batches": 0, "jobs": 0, "rows": 0, "largest_batch": 0, "cancelled": 0, "failed": 0}

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mlx-blip2-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.cancel()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def queued(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def arrive(self) -> None:
        """A request is being read and will queue a job (``depart`` when it did, or failed): while requests are on
        their way, the batcher waits for them, up to the batch window; when none are, a lone request runs at once."""
        with self._lock:
            self._incoming += 1

    def depart(self) -> None:
        with self._lock:
            self._incoming -= 1

    def submit(self, job: Job) -> Job:
        if self._stopping or self._thread is None:
            raise APIError(503, "the server is shutting down")
        if self.queued() >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.max_queue} requests queued); retry later",
                           headers={"Retry-After": "1"})
        self._queue.put(job)
        return job

    # --- batching ---

    def _gather(self, first: Job) -> None:
        """Move what queued up meanwhile to the pending jobs; while requests are still being read, wait for them up
        to the batch window, or until ``first``'s batch is full."""
        end = time.monotonic() + (self.batch_window if first.key is not None and self.max_batch > 1 else 0)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = end - time.monotonic()
                if remaining <= 0 or self._incoming == 0:
                    return
                try:
                    job = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if job is _STOP:
                self._stopping = True
                self._queue.put(_STOP)
                return
            self._pending.append(job)
            if first.key is not None and sum(j.rows for j in self._pending if j.key == first.key) >= self.max_batch:
                return

    def _next_batch(self) -> list[Job] | None:
        if not self._pending:
            job = self._queue.get()
            if job is _STOP:
                return None
            self._pending.append(job)
        first = self._pending[0]
        self._gather(first)
        self._pending.popleft()
        batch, rows = [first], first.rows
        if first.key is not None:
            for job in list(self._pending):
                if job.key == first.key and rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
                    self._pending.remove(job)
        return batch

    # --- the loop ---

    def _loop(self) -> None:
        import mlx.core as mx

        try:
            self._serve_jobs()
        finally:
            # MLX gives each thread its own default stream, run by a thread of its own: end it with this one, or
            # interpreter shutdown may destroy it still running and abort the process.
            mx.clear_streams()

    def _serve_jobs(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                for job in self._pending:
                    job.cancel()
                self._pending.clear()
                return
            live = [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]
            self.stats["cancelled"] += len(batch) - len(live)
            if not live:
                continue
            rows = sum(j.rows for j in live)
            self.busy = True
            self.stats["batches"] += 1
            self.stats["jobs"] += len(live)
            self.stats["rows"] += rows
            self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
            try:
                self._settle(live)
            finally:
                self.busy = False

    def _settle(self, jobs: list[Job]) -> None:
        """Run jobs of one kind; every failure reaches its requests and never ends the thread."""
        try:
            getattr(self, f"_run_{jobs[0].kind}")(jobs)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, GenerationCancelled):
                self.stats["cancelled"] += len(jobs)
            else:
                self.stats["failed"] += len(jobs)
                if not isinstance(e, (APIError, ValueError, TypeError)):
                    log.exception("model call failed")
            for job in jobs:
                if job.events is not None:
                    job.emit(("error", e))
                if not job.future.done():
                    job.future.set_exception(e)

    # --- generation ---

    def _run_generate(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.payload["rows"]]
        try:
            results = self.engine.generate(rows, jobs[0].payload["options"],
                                           should_stop=lambda: all(j.cancelled.is_set() for j in jobs))
        except ContextLengthError:
            if len(jobs) == 1:
                raise
            for job in jobs:  # each alone: only the request that is too long fails
                self._settle([job])
            return
        _hand_out(jobs, "rows", results)

    def _run_stream(self, jobs: list[Job]) -> None:
        (job,) = jobs
        gen = self.engine.stream(job.payload["row"], job.payload["options"], should_stop=job.cancelled.is_set)
        prompt_tokens = 0
        try:
            for response in gen:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    break
                job.emit(("chunk", response))
                prompt_tokens = response.prompt_tokens or prompt_tokens
        finally:
            gen.close()
        job.emit(("end", prompt_tokens))
        job.future.set_result(None)

    # --- retrieval ---

    def _run_embed_images(self, jobs: list[Job]) -> None:
        _hand_out(jobs, "images", self.pipeline.embed_images([im for job in jobs for im in job.payload["images"]]))

    def _run_embed_texts(self, jobs: list[Job]) -> None:
        embeds = self.pipeline.embed_texts([t for job in jobs for t in job.payload["texts"]])
        tokenizer = getattr(getattr(self.pipeline, "processor", None), "tokenizer", None)
        i = 0
        for job in jobs:
            n = len(job.payload["texts"])
            tokens = sum(len(tokenizer(t)["input_ids"]) for t in job.payload["texts"]) if tokenizer else 0
            job.future.set_result((embeds[i:i + n], tokens))
            i += n

    def _run_match(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                job.future.set_exception(GenerationCancelled())
                continue
            p = job.payload
            try:
                if p["mode"] == "itc":
                    scores = self.pipeline.similarity([p["image"]], p["texts"])[0]
                else:
                    scores = self.pipeline.match(p["image"], p["texts"])
                job.future.set_result([float(s) for s in list(scores)])
            except Exception as e:  # noqa: BLE001 - one job's failure is its own
                job.future.set_exception(e)


def _hand_out(jobs: list[Job], key: str, results) -> None:
    """Give each job of a batched call its slice of the results, in order (``len(job.payload[key])`` items)."""
    i = 0
    for job in jobs:
        n = len(job.payload[key])
        job.future.set_result(results[i:i + n])
        i += n
