"""Synthetic chest X-ray generation speed at 224 px vs decoding the same images from PNG files.

The peer is what a file-based dataset costs per image (PIL open + decode of a 224 px grayscale PNG),
so the ratio says whether generating on the fly is ever the bottleneck of the input pipeline.

    OMP_NUM_THREADS=1 python benchmarks/bench_synthetic.py [--num_images 300 --image_size 224 --repeats 3]
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image


from data_scripts.synthetic_cxr import generate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    gen_rates, png_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, study in enumerate(generate(args.num_images, 0, args.image_size)):
            path = os.path.join(tmp, f"{i}.png")
            Image.fromarray(study["image"]).save(path)
            paths.append(path)
        for _ in range(args.repeats):          # interleaved, so load changes hit both alike
            start = time.perf_counter()
            for study in generate(args.num_images, 1, args.image_size):
                np.asarray(study["image"])
            gen_rates.append(args.num_images / (time.perf_counter() - start))
            start = time.perf_counter()
            for path in paths:
                with Image.open(path) as im:
                    np.asarray(im.convert("L"))
            png_rates.append(args.num_images / (time.perf_counter() - start))
    gen, png = statistics.median(gen_rates), statistics.median(png_rates)
    print(f"{args.num_images} images at {args.image_size} px, median of {args.repeats}")
    print(f"synthetic generation (image + report + labels + masks): {gen:.1f} images/s  runs {[round(r) for r in gen_rates]}")
    print(f"PNG decode (PIL) of the same images:                    {png:.1f} images/s  runs {[round(r) for r in png_rates]}")
    print(f"ratio generation / PNG decode: {gen / png:.3f}")


if __name__ == "__main__":
    main()
