"""Caption a folder of images with Ray Data: a pool of actors, each with the model loaded once.

    pip install 'mlx-blip2[ray]'
    python examples/ray_caption.py --model Salesforce/blip2-opt-2.7b --images ~/Pictures --out captions/
    python -c "import pandas as pd; print(pd.read_parquet('captions/'))"      # path, caption, error

On a cluster, start Ray there (``ray start --head`` / ``--address``) and this script joins it (``--address auto``).
Without --images it captions a few generated pictures, to show the pipeline end to end.
"""

import argparse
import os
import tempfile

import numpy as np
from PIL import Image


def sample_images(folder: str, n: int = 6) -> list[str]:
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = os.path.join(folder, f"sample{i}.png")
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")  # gets an error row; the batch goes on
    return paths + [os.path.join(folder, "broken.jpg")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Salesforce/blip2-opt-2.7b")
    ap.add_argument("--images", default=None, help="a folder of images (default: a few generated ones)")
    ap.add_argument("--out", default=None,
                    help="write Parquet files into this folder, replacing what is there (default: print the rows)")
    ap.add_argument("--address", default=None, help="a Ray cluster to join ('auto'); default: a local Ray")
    ap.add_argument("--actors", type=int, default=1, help="model replicas (each loads the model once)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import pandas as pd
    import ray

    from mlx_blip2.files import find_images
    from mlx_blip2.ray import Captioner

    ray.init(address=args.address, num_cpus=None if args.address else 2, include_dashboard=False,
             log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f.path for f in find_images([args.images], recursive=True).files] if args.images \
            else sample_images(tmp)
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": args.model, "column": "path",
                                                              "max_new_tokens": 20},
                            batch_size=args.batch_size, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=args.actors))
        if args.out:
            ds.write_parquet(args.out, mode="overwrite")  # a rerun replaces the rows instead of adding them again
            print(f"wrote {len(pd.read_parquet(args.out))} rows to {args.out} (read them with pd.read_parquet)")
        else:
            for row in ds.take_all():
                print(f"{os.path.basename(row['path'])}: {row['caption'] if row['error'] is None else 'ERROR ' + row['error']}")
    ray.shutdown()


if __name__ == "__main__":
    main()
