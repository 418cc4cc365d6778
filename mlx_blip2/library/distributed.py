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

import numpy as np

from ..files import ImageFile
from .launch import Group
from .parts import leftover_parts, merge_leftovers, merge_parts, part_path
from .progress import Progress, Summary, format_duration
from .records import RecordWriter
from .run import BatchCaptioner, _Batches, _plan
from .sidecars import SidecarWriter, sidecar_writer
from .writer import UsageError

REPORT_EVERY = 10.0  # seconds between rank 0's progress lines when stderr is not a terminal


def _plan_on_rank0(job, mine: list[ImageFile], sidecars: SidecarWriter | None, summary: Summary):
    """Rank 0: lock the output, merge leftovers, decide what is left. Returns (output writer, to-do mask)."""
    if sidecars is not None:
        out = sidecars
    else:
        out = RecordWriter(job.format, job.model_name, job.prompt, path=job.output)
        try:
            merge_leftovers(out)
        except BaseException:
            out.close()
            raise
    pool = ThreadPoolExecutor(max_workers=job.workers or min(8, os.cpu_count() or 1))
    try:
        todo = _plan(mine, out, job.existing, pool, summary)
    finally:
        pool.shutdown(wait=True)
    index = {image.path: i for i, image in enumerate(mine)}
    mask = np.zeros(len(mine), np.uint8)
    mask[[index[image.path] for image, _, _ in todo]] = 1
    return out, mask


def _start(job, mine: list[ImageFile], sidecars: SidecarWriter | None, group: Group, summary: Summary):
    """Every rank: rank 0's plan, or its error, sent to all. Returns (rank 0's output writer, everything left to do,
    this rank's share of it)."""
    out, problem, mask = None, None, np.zeros(len(mine), np.uint8)
    if group.rank == 0:
        try:
            out, mask = _plan_on_rank0(job, mine, sidecars, summary)
        except (UsageError, OSError) as e:
            problem = {"error": str(e), "usage": isinstance(e, UsageError)}
    header = group.broadcast_json([len(mine), problem])
    if header[0] != len(mine):
        problem = problem or {"error": f"rank {group.rank} found {len(mine)} images, rank 0 {header[0]}: every "
                                       "host must see the same images at the same paths", "usage": True}
    counts = group.sum(np.array([1 if problem else 0], np.int32))
    if header[1] or counts[0]:
        problem = header[1] or problem or {"error": "another rank found other images", "usage": True}
        if out is not None:
            out.close()
        raise UsageError(problem["error"]) if problem["usage"] else OSError(problem["error"])
    todo = [image for image, m in zip(mine, group.broadcast_mask(mask)) if m]
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


def _share_writer(job, sidecars: SidecarWriter | None, rank: int):
    if sidecars is not None:
        return sidecars
    return RecordWriter("jsonl", job.model_name, job.prompt, path=part_path(job.output, rank))


def _caption_share(pipe, job, sidecars: SidecarWriter | None, group: Group, share: list, total: int,
                   summary: Summary) -> dict:
    """Caption this rank's share into its part file (or sidecars), in step with the other ranks. Whatever goes
    wrong here is reported (to rank 0), never raised: the rank stays in step until the end."""
    report = {"fatal": None, "usage": False, "part": None, "records": 0}
    workers = job.workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-blip2-decode")
    reporter = _Reporter(total, job.progress, group.rank)
    steps, writer = iter(()), None
    try:
        try:
            writer = _share_writer(job, sidecars, group.rank)
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


def _finish(output: str | None, group: Group, out, summary: Summary, report: dict) -> list[dict]:
    """Send every rank's report and failures to all; rank 0 merges the parts into the output (if any)."""
    report = {**report, "captioned": summary.captioned, "skipped": summary.skipped, "failed": summary.failed}
    reports = [json.loads(b) for b in group.gather(json.dumps(report).encode("utf-8"))]
    if group.rank != 0 or out is None:
        return reports
    try:
        if isinstance(out, RecordWriter):
            parts = leftover_parts(output)
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


def end_job(group: Group, summary: Summary, report: dict, output: str | None = None, out=None) -> None:
    """Every rank: gather the reports (rank 0 merging the parts), then a last barrier; rank 0's summary becomes the
    job's. Only after this may rank 0 exit non-zero."""
    try:
        reports = _finish(output, group, out, summary, report)
    finally:
        group.barrier()
    if group.rank == 0:
        combine(summary, reports)


def caption_distributed(pipe, job, files: list[ImageFile], mine: list[ImageFile],
                        group: Group) -> tuple[Summary, list[str]]:
    """One rank's part of a launched, checked CaptionJob: ``mine`` is the launch's shard of ``files``. Rank 0 returns
    the summary of the whole job (its ``rank`` is 0); the others return theirs with ``rank`` set, for the caller to
    exit 0 quietly."""
    if job.format not in ("jsonl", "csv", "txt", "xmp") or (job.format in ("jsonl", "csv") and job.output is None):
        raise UsageError("under mlx.launch, write records to a file (-o captions.jsonl) or sidecars "
                         "(--format txt or xmp)")
    start = time.monotonic()
    sidecars = sidecar_writer(job.format, job.xmp_name, files) if job.format in ("txt", "xmp") else None
    summary = Summary(total=len(mine), rank=group.rank)
    out, todo, share = _start(job, mine, sidecars, group, summary)
    report = {"fatal": None, "usage": False, "part": None, "records": 0}
    try:
        report = _caption_share(pipe, job, sidecars, group, share, len(todo), summary)
    finally:
        end_job(group, summary, report, None if job.output is None else os.fspath(job.output), out)
    summary.seconds = time.monotonic() - start
    return summary, list(getattr(out, "notes", []))
