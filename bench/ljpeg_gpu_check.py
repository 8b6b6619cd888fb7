"""On a CUDA machine: does DALI decode our lossless JPEG on the GPU, pixel-exactly, and how fast?

Not run in this repository's tests (its machines have no GPU). It encodes the first
--images NIH sample PNGs as `pack --codec ljpeg` does (libjpeg-turbo, predictor 1) and,
for comparison, with imagecodecs' lj92 (predictor 6), then decodes each set with
`fn.decoders.image` on device "cpu" and "mixed" (output GRAY, uint8) and reports
per set and device: images/s (best of --repeats, pipeline built once) and whether
every image equals PIL's decode of the source PNG. "mixed" that is no faster than
"cpu" suggests DALI fell back to its CPU decoder (nvImageCodec's nvJPEG lossless
plugin produces 16-bit output only; DALI_LOG / nvimgcodec logging shows which ran).

    python bench/ljpeg_gpu_check.py --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = Path(os.environ.get("CXR_NIH", ROOT.parent / "shared" / "data" / "nih")) / "sample"


def encoded_sets(sample: Path, n: int) -> tuple[list[np.ndarray], dict[str, list[bytes]]]:
    import imagecodecs
    from PIL import Image

    from shards.image_codec import encode

    names = list(pd.read_csv(sample / "labels.csv")["Image Index"])[:n]
    images = [Image.open(sample / name).convert("L") for name in names]
    return [np.asarray(im) for im in images], {
        "ljpeg (pack: predictor 1)": [encode(im, "ljpeg") for im in images],
        "lj92 (predictor 6)": [bytes(imagecodecs.ljpeg_encode(np.asarray(im))) for im in images],
    }


def decode(data: list[bytes], device: str, batch: int, repeats: int) -> tuple[float, list[np.ndarray]]:
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(d, np.uint8) for d in data]
    state = {"i": 0}

    def source():
        i = state["i"] % len(arrays)
        state["i"] += batch
        return [arrays[(i + j) % len(arrays)] for j in range(batch)]

    @pipeline_def(batch_size=batch, num_threads=2, device_id=0, prefetch_queue_depth=1)
    def pipe():
        return fn.decoders.image(
            fn.external_source(source=source, batch=True, dtype=types.UINT8), device=device, output_type=types.GRAY
        )

    p = pipe()
    p.build()
    rounds = -(-len(arrays) // batch)
    out: list[np.ndarray] = []
    for _ in range(rounds):  # warm-up pass, also the pixels checked
        (images,) = p.run()
        images = images.as_cpu() if device == "mixed" else images
        out += [np.asarray(images[k])[..., 0] for k in range(batch)]
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            (images,) = p.run()
            if device == "mixed":
                images.as_cpu()  # wait for the GPU
        best = max(best, rounds * batch / (time.perf_counter() - start))
    return best, out[: len(arrays)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="folder of NIH PNGs with labels.csv")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources, sets = encoded_sets(args.sample, args.images)
    print(f"{args.images} NIH 1024² images, batch {args.batch}, best of {args.repeats}")
    for name, data in sets.items():
        for device in ("cpu", "mixed"):
            rate, pixels = decode(data, device, args.batch, args.repeats)
            exact = all(np.array_equal(a, b) for a, b in zip(pixels, sources))
            print(f"{name:<28} {device:<6} {rate:8.0f} img/s  pixel-exact: {exact}")


if __name__ == "__main__":
    main()
