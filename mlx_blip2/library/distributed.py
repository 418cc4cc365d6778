"""Captioning on several processes and machines: ``mlx.launch -n N [--hosts ...] -- mlx-blip2 caption ...``.

Every rank finds the same files (folder walk or manifest). Rank 0 takes the output's lock (the output file itself,
so a second run on it, launched or not, is refused), merges the part files a killed run left (:mod:`.parts`) and
decides what is left to do; it sends that to the others (``mx.distributed.all_sum``), and each rank captions every
N-th image of it: a deterministic share, balanced within one image. Records go to each rank's part file beside the
output (fsynced per batch); sidecars are written by the rank that captions the image. After each batch the ranks add
up their counts (rank 0 shows the progress of the whole job); at the end they send rank 0 their failures, rank 0
merges the parts into the output, and after a last barrier prints the summary and exits 1 if something failed.
Every other rank exits 0 (mlx.launch stops all ranks as soon as one exits non-zero), whatever went wrong on it:
what failed is reported by rank 0. The output's folder must be shared by all hosts (as the images must be).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..files import ImageFile
from .parts import leftover_parts, merge_leftovers, merge_parts, part_path
from .progress import Progress, Summary, format_duration
from .records import RecordWriter
from .run import BatchCaptioner, _Batches, _plan
from .sidecars import SidecarWriter, sidecar_conflicts
from .writer import UsageError

LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # set by mlx.launch (ring, jaccl) and mpirun
REPORT_EVERY = 10.0  # seconds between rank 0's progress lines when stderr is not a terminal


def launched() -> bool:
    """Whether this process is one rank of an ``mlx.launch`` (or mpirun) job."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


class Group:
    """The ranks of a job, with the few collectives a run needs (all built on ``mx.distributed.all_sum``)."""

    def __init__(self, group=None):
        import mlx.core as mx

        self._mx = mx
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def sum(self, values) -> np.ndarray:
        mx = self._mx
        out = mx.distributed.all_sum(mx.array(np.asarray(values)), group=self.group)
        return np.array(out)

    def barrier(self) -> None:
        self.sum(np.ones(1, np.int32))

    def gather(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, on every rank (rank r's bytes land in their own slice of a summed buffer)."""
        lengths = np.zeros(self.size, np.int64)
        lengths[self.rank] = len(data)
        lengths = self.sum(lengths).astype(np.int64)
        if not lengths.sum():
            return [b""] * self.size
        start = int(lengths[:self.rank].sum())
        buf = np.zeros(int(lengths.sum()), np.uint8)
        buf[start:start + len(data)] = np.frombuffer(data, np.uint8)
        buf = self.sum(buf).astype(np.uint8).tobytes()
        ends = np.cumsum(lengths)
        return [buf[int(e - n):int(e)] for e, n in zip(ends, lengths)]

    def broadcast(self, data: bytes) -> bytes:
        """Rank 0's ``data``, on every rank."""
        return self.gather(data if self.rank == 0 else b"")[0]


def current_group() -> Group | None:
    """The job this process is a rank of, or None when it runs alone (no mlx.launch, or a job of one)."""
    if not launched():
        return None
    try:
        group = Group()
    except RuntimeError:
        hostfile = os.environ.get("MLX_HOSTFILE")
        if hostfile and os.path.isfile(hostfile) and os.path.getsize(hostfile) < 8:
            return None  # mlx.launch -n 1 hands its one rank an empty hostfile (mlx 0.32)
        raise
    return group if group.size > 1 else None


@dataclass
class Job:
    """What every rank knows: the options of ``mlx-blip2 caption``, and its images (after ``--shard``)."""

    files: list[ImageFile]  # everything found (sidecar conflicts are decided on these)
    mine: list[ImageFile]  # this launch's shard of them
    fmt: str
    output: str | None
    xmp_name: str
    model_name: str | None
    prompt: str | None
    existing: str = "skip"
    batch_size: int = 8
    workers: int | None = None
    generate_kwargs: dict = field(default_factory=dict)
    progress: bool | None = None

    def sidecar_writer(self) -> SidecarWriter:
        writer = SidecarWriter(self.fmt, self.xmp_name)
        writer.conflicts = sidecar_conflicts(self.files, writer.sidecar)
        return writer


def _plan_on_rank0(job: Job, summary: Summary):
    """Rank 0: lock the output, merge leftovers, decide what is left. Returns (output writer, to-do mask)."""
    if job.fmt in ("txt", "xmp"):
        out = job.sidecar_writer()
    else:
        out = RecordWriter(job.fmt, job.model_name, job.prompt, path=job.output)
        try:
            merge_leftovers(out)
        except BaseException:
            out.close()
            raise
    pool = ThreadPoolExecutor(max_workers=job.workers or min(8, os.cpu_count() or 1))
    try:
        todo = _plan(job.mine, out, job.existing, pool, summary)
    finally:
        pool.shutdown(wait=True)
    index = {image.path: i for i, image in enumerate(job.mine)}
    mask = np.zeros(len(job.mine), np.uint8)
    mask[[index[image.path] for image, _, _ in todo]] = 1
    return out, mask


def _start(job: Job, group: Group, summary: Summary):
    """Every rank: rank 0's plan, or its error, sent to all. Returns (rank 0's output writer, this rank's share)."""
    out, problem, mask = None, None, np.zeros(len(job.mine), np.uint8)
    if group.rank == 0:
        try:
            out, mask = _plan_on_rank0(job, summary)
        except (UsageError, OSError) as e:
            problem = {"error": str(e), "usage": isinstance(e, UsageError)}
    digest = json.dumps([len(job.mine), problem]).encode("utf-8")
    header = json.loads(group.broadcast(digest))
    if header[0] != len(job.mine):
        problem = problem or {"error": f"rank {group.rank} found {len(job.mine)} images, rank 0 {header[0]}: every "
                                       "host must see the same images at the same paths", "usage": True}
    counts = group.sum(np.array([1 if problem else 0], np.int32))
    if header[1] or counts[0]:
        problem = header[1] or problem or {"error": "another rank found other images", "usage": True}
        if out is not None:
            out.close()
        raise UsageError(problem["error"]) if problem["usage"] else OSError(problem["error"])
    mask = np.frombuffer(group.broadcast(np.packbits(mask).tobytes()), np.uint8)
    todo = [image for image, m in zip(job.mine, np.unpackbits(mask)[:len(job.mine)]) if m]
    return out, todo, todo[group.rank::group.size]


class _Reporter:
    """Rank 0's view of the whole job: a progress bar on a terminal, else a line every REPORT_EVERY seconds."""

    def __init__(self, total: int, enabled: bool | None, rank: int):
        stream = sys.stderr
        self.on = rank == 0 and enabled is not False and total > 0
        self.tty = self.on and (enabled is True or stream.isatty())
        self.bar = Progress(total, enabled=self.tty) if self.tty else None
        self.total, self.start, self.last = total, time.monotonic(), time.monotonic()

    def update(self, done: int, failed: int, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(done, failed, force)
        elif self.on and (force or time.monotonic() - self.last >= REPORT_EVERY):
            self.last = time.monotonic()
            elapsed = self.last - self.start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f", ETA {format_duration((self.total - done) / rate)}" if rate > 0 and done < self.total else ""
            print(f"progress: {done}/{self.total} images, {failed} failed, {rate * 60:.1f} images/min{eta}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _share_writer(job: Job, rank: int):
    if job.fmt in ("txt", "xmp"):
        return job.sidecar_writer()
    return RecordWriter("jsonl", job.model_name, job.prompt, path=part_path(job.output, rank))


def _caption_share(pipe, job: Job, group: Group, share: list, total: int, summary: Summary) -> dict:
    """Caption this rank's share into its part file (or sidecars), in step with the other ranks. Whatever goes
    wrong here is reported (to rank 0), never raised: the rank stays in step until the end."""
    report = {"fatal": None, "usage": False, "part": None, "records": 0}
    workers = job.workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-blip2-decode")
    reporter = _Reporter(total, job.progress, group.rank)
    steps, writer = iter(()), None
    try:
        try:
            writer = _share_writer(job, group.rank)
            report["part"] = getattr(writer, "path", None)
            items = _plan(share, writer, job.existing, pool, summary)
            if items:
                pipe = pipe() if not hasattr(pipe, "engine") else pipe
                captioner = BatchCaptioner(pipe, job.prompt, **job.generate_kwargs)
                batches = _Batches(captioner, writer, summary, Progress(0, enabled=False))
                steps = batches.steps(items, pool, job.batch_size, workers)
        except Exception as e:  # noqa: BLE001 - reported by rank 0; this rank stays in step
            report.update(fatal=f"{type(e).__name__}: {e}", usage=isinstance(e, (UsageError, NotImplementedError)))
        _in_step(group, steps, summary, reporter, report)
    finally:
        reporter.close()
        pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                report["fatal"] = report["fatal"] or f"{type(e).__name__}: {e}"
    if isinstance(writer, RecordWriter):
        report["records"] = len(writer.records)
    return report


def _in_step(group: Group, steps, summary: Summary, reporter: _Reporter, report: dict) -> None:
    """One batch per round, then the ranks add up (captioned, failed, still busy) until none is busy."""
    busy = True
    base_failed = len(summary.failed)
    while True:
        if busy:
            try:
                busy = next(steps, StopIteration) is not StopIteration
            except Exception as e:  # noqa: BLE001 - e.g. the part file can't be written: reported, not fatal here
                report["fatal"] = report["fatal"] or f"{type(e).__name__}: {e}"
                busy = False
        done = summary.captioned + len(summary.failed) - base_failed
        totals = group.sum(np.array([done, len(summary.failed) - base_failed, int(busy)], np.int64))
        reporter.update(int(totals[0]), int(totals[1]), force=not totals[2])
        if not totals[2]:
            return


def _finish(job: Job | None, group: Group, out, summary: Summary, report: dict) -> list[dict]:
    """Send every rank's report and failures to all; rank 0 merges the parts into the output (if any)."""
    report = {**report, "captioned": summary.captioned, "skipped": summary.skipped, "failed": summary.failed}
    reports = [json.loads(b) for b in group.gather(json.dumps(report).encode("utf-8"))]
    if group.rank != 0 or out is None:
        return reports
    try:
        if isinstance(out, RecordWriter):
            parts = leftover_parts(job.output)
            missing = [r for r in reports if r["part"] and r["records"] and r["part"] not in parts]
            for r in missing:
                r["fatal"] = r["fatal"] or (f"its part file '{r['part']}' is not visible to rank 0: the output's "
                                            "folder must be shared by every host (rerun there to merge it)")
            merge_parts(out, parts)
    finally:
        out.close()
    return reports


def combine(summary: Summary, reports: list[dict]) -> None:
    """Rank 0: the job's summary from every rank's report."""
    summary.captioned = sum(r["captioned"] for r in reports)
    summary.skipped = sum(r["skipped"] for r in reports)
    summary.failed = [tuple(f) for r in reports for f in r["failed"]]
    summary.errors = [f"rank {i}: {r['fatal']}" for i, r in enumerate(reports) if r["fatal"]]
    summary.usage_error = any(r["usage"] for r in reports if r["fatal"])


def end_job(group: Group, summary: Summary, report: dict, job: Job | None = None, out=None) -> None:
    """Every rank: gather the reports (rank 0 merging the parts), then a last barrier; rank 0's summary becomes the
    job's. Only after this may rank 0 exit non-zero."""
    try:
        reports = _finish(job, group, out, summary, report)
    finally:
        group.barrier()
    if group.rank == 0:
        combine(summary, reports)


def caption_distributed(pipe, job: Job, group: Group) -> tuple[Summary, list[str]]:
    """One rank's part of a launched ``mlx-blip2 caption``. Rank 0 returns the summary of the whole job (its
    ``rank`` is 0); the others return theirs with ``rank`` set, for the caller to exit 0 quietly."""
    if job.fmt not in ("jsonl", "csv", "txt", "xmp") or (job.fmt in ("jsonl", "csv") and job.output is None):
        raise UsageError("under mlx.launch, write records to a file (-o captions.jsonl) or sidecars "
                         "(--format txt or xmp)")
    start = time.monotonic()
    summary = Summary(total=len(job.mine), rank=group.rank)
    out, todo, share = _start(job, group, summary)
    report = {"fatal": None, "usage": False, "part": None, "records": 0}
    try:
        report = _caption_share(pipe, job, group, share, len(todo), summary)
    finally:
        end_job(group, summary, report, job, out)
    summary.seconds = time.monotonic() - start
    return summary, list(getattr(out, "notes", []))
