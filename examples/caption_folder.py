"""Caption a folder of photos into a jsonl file, then rerun: the second run skips what is already captioned.

    python examples/caption_folder.py [--model Salesforce/blip2-opt-2.7b] [FOLDER]

The same as `mlx-blip2 caption FOLDER -r -o captions.jsonl` (which also writes .txt or XMP sidecars with --format).
"""

import argparse
import json
import tempfile
from pathlib import Path

from mlx_blip2.library import caption_paths
from mlx_blip2.pipelines import load

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/blip2-opt-2.7b")
parser.add_argument("folder", nargs="?", default=str(HERE / "images"))
args = parser.parse_args()

pipe = load(args.model)
with tempfile.TemporaryDirectory() as tmp:
    output = Path(tmp) / "captions.jsonl"
    summary, _ = caption_paths(pipe, [args.folder], output=output, recursive=True, model_name=args.model)
    print(summary.line())
    for line in output.read_text().splitlines():
        record = json.loads(line)
        print(f"{record['path']}: {record.get('caption', 'error: ' + str(record.get('error')))}")

    # A rerun (after a crash, or when new photos arrive) only captions what is new or changed.
    summary, _ = caption_paths(pipe, [args.folder], output=output, recursive=True, model_name=args.model)
    print("rerun:", summary.line())
    assert summary.skipped == summary.total
