"""Generation runs (captioning and question answering) on the engine, in batches, one record per item.

Items already recorded are skipped (failed ones are tried again), so a killed run resumes; under ``mlx.launch``
each rank takes every n-th of the items left and writes its own part (:mod:`.store`). An item whose image cannot be
read gets an error record and the run goes on.
"""

from __future__ import annotations

from ..pipelines.engine import Row
from .store import read_records, recording
from .tasks.data import Item


def pending(items: list[Item], out_dir: str) -> list[Item]:
    """The items without a successful record yet."""
    done = read_records(out_dir)
    return [item for item in items if "output" not in done.get(item.key, {})]


def share(items: list, group) -> list:
    return items if group is None else items[group.rank::group.size]


def _generate_batch(engine, batch: list[Item], prompts: list, options) -> list[dict]:
    rows = [Row(image=item.image, prompt=p) for item, p in zip(batch, prompts)]
    try:
        outs = engine.generate(rows, options)
        return [{"key": item.key, "output": out[0].text} for item, out in zip(batch, outs)]
    except Exception:  # noqa: BLE001 - one bad image must not sink the batch: retry each item alone
        if len(batch) == 1:
            raise
    records = []
    for item, row in zip(batch, rows):
        try:
            records.append({"key": item.key, "output": engine.generate([row], options)[0][0].text})
        except Exception as e:  # noqa: BLE001 - recorded, reported, retried by the next run
            records.append({"key": item.key, "error": f"{type(e).__name__}: {e}"})
    return records


def run_generation(engine, items: list[Item], prompt_for, options, out_dir: str, *, batch_size: int = 8,
                   group=None, progress: bool | None = None) -> dict:
    """Generate for every item not yet recorded; returns all records (on rank 0 of a launched job, after the
    merge; other ranks get their view of the shared files). ``prompt_for(item)`` gives each row's prompt."""
    todo = share(pending(items, out_dir), group)
    done = failed = 0
    with recording(out_dir, group, len(todo), progress) as (appender, bar):
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            try:
                records = _generate_batch(engine, batch, [prompt_for(item) for item in batch], options)
            except Exception as e:  # noqa: BLE001 - a single item that fails is recorded like any other
                records = [{"key": batch[0].key, "error": f"{type(e).__name__}: {e}"}]
            appender.write(records)
            done += len(records)
            failed += sum(1 for r in records if "error" in r)
            bar.update(done, failed)
    return read_records(out_dir)
