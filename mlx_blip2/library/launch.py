"""What a job under ``mlx.launch`` needs, for captioning (:mod:`.distributed`) and indexing
(:mod:`mlx_blip2.photo_index.distributed`) alike: the group of ranks, the lock that keeps a second run off the
output, and the part files each rank writes beside that output until rank 0 merges them.

A part file of ``DIR/out.ext`` is ``DIR/.out.ext.part-R<suffix>`` for rank R: hidden, beside the output (so on the
folder every host shares), and found again by name after a kill, whatever number of ranks wrote it.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # set by mlx.launch (ring, jaccl) and mpirun


def launched() -> bool:
    """Whether this process is one rank of an ``mlx.launch`` (or mpirun) job."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


def is_follower() -> bool:
    """Whether this process is a launched rank other than 0 (it exits 0 quietly: rank 0 reports for the job)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in LAUNCH_ENV)


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

    def broadcast_json(self, value):
        """Rank 0's JSON-able ``value``, on every rank."""
        return json.loads(self.broadcast(json.dumps(value).encode("utf-8")))

    def broadcast_mask(self, mask: np.ndarray) -> np.ndarray:
        """Rank 0's 0/1 ``mask`` (which items are left to do), on every rank, as bits packed for the wire."""
        return np.unpackbits(np.frombuffer(self.broadcast(np.packbits(mask).tobytes()), np.uint8))[:len(mask)]


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


def lock_open_file(f, error: Exception) -> None:
    """Hold an exclusive lock on the open file ``f`` until it is closed; raise ``error`` if another process (a second
    run on the same output) holds it. Nothing is locked where there is no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise error from None


def open_lock_file(output: str | os.PathLike, error: Exception):
    """The file ``.NAME.launch.lock`` beside ``output``, opened and locked (see :func:`lock_open_file`); the lock is
    held until the returned file is closed."""
    directory, name = os.path.split(os.path.abspath(os.fspath(output)))
    f = open(os.path.join(directory, f".{name}.launch.lock"), "a+b")  # noqa: SIM115 - held until the job ends
    try:
        lock_open_file(f, error)
    except BaseException:
        f.close()
        raise
    return f


def part_path(output: str | os.PathLike, rank: int, suffix: str) -> str:
    """Rank ``rank``'s part file beside ``output``."""
    directory, name = os.path.split(os.path.abspath(os.fspath(output)))
    return os.path.join(directory, f".{name}.part-{rank}{suffix}")


def leftover_parts(output: str | os.PathLike, suffix: str) -> list[str]:
    """The part files beside ``output``, whatever run (and number of ranks) left them, by rank."""
    directory, name = os.path.split(os.path.abspath(os.fspath(output)))
    pattern = re.compile(re.escape(f".{name}.part-") + r"(\d+)" + re.escape(suffix))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n))]
    return [os.path.join(directory, n) for _, n in sorted(found)]
