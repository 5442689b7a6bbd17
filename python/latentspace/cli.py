"""The `latentspace` command line: `latentspace info`, `latentspace demo`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from . import datasets
from .indexes import FlatIndex
from .runtime import build_info, get_num_threads, set_num_threads

_SHADES = " .:-=+*#%@"


def _digit_rows(image: np.ndarray) -> list[str]:
    """An 8x8 image in [0, 1] as 8 lines of ASCII shading (two characters per pixel)."""
    levels = np.minimum((image.reshape(8, 8) * (len(_SHADES) - 1)).round().astype(int), len(_SHADES) - 1)
    return ["".join(_SHADES[v] * 2 for v in row) for row in levels]


def _command_info(args: argparse.Namespace) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"latentspace {info['version']}")
    print(f"  SIMD level in use : {info['simd_level']} (CPU supports {info['hardware_simd_level']})")
    print(f"  OpenMP threads    : {info['num_threads']}")
    arch = ", ".join(f"sm_{a}" for a in info["cuda_architectures"]) or "-"
    print(f"  CUDA compiled in  : {'yes' if info['cuda_compiled'] else 'no'} (architectures: {arch})")
    if info["gpu_visible"]:
        for device in info["cuda_devices"]:
            major, minor = device["compute_capability"]
            print(f"  GPU {device['index']}             : {device['name']} (sm_{major}{minor}, "
                  f"{device['total_memory_bytes'] / 2**30:.0f} GiB)")
    else:
        print(f"  GPU visible now   : no ({info['cuda_unavailable_reason']})")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    if args.threads is not None:
        set_num_threads(args.threads)
    images, labels = datasets.load_digits()
    n, dim = images.shape
    print(f"latentspace demo: exact search over the {n:,} handwritten digits bundled with "
          f"scikit-learn ({dim} pixels each)")

    index = FlatIndex(dim, metric="l2")
    index.add(images)
    print(f"  index: {index!r}, {index.bytes_per_vector} bytes per vector")

    # Every digit's nearest neighbours (the first is the digit itself, at distance 0).
    k = args.k + 1
    start = time.perf_counter()
    distances, indices = index.search(images, k)
    elapsed = time.perf_counter() - start
    print(f"  searched all {n:,} digits for {args.k} neighbours each in {elapsed * 1e3:.1f} ms "
          f"({build_info()['simd_level']}, {get_num_threads()} threads)")
    neighbours = indices[:, 1:]
    agreement = float((labels[neighbours] == labels[:, None]).mean())
    print(f"  {args.k}-NN label agreement in pixel space: {agreement:.3f} "
          "(share of neighbours showing the same digit)\n")

    rng = np.random.default_rng(args.seed)
    for query in rng.choice(n, size=args.examples, replace=False):
        shown = neighbours[query, : args.show]
        print(f"  digit #{query} (label {labels[query]}) and its {len(shown)} nearest neighbours:")
        columns = [_digit_rows(images[query])] + [_digit_rows(images[j]) for j in shown]
        for line in zip(*columns):
            print("    " + "  |  ".join(line))
        captions = [f"query {labels[query]}".ljust(16)] + [
            f"#{j} label {labels[j]}".ljust(16) for j in shown
        ]
        dists = [" " * 16] + [f"d={distances[query, 1 + i]:.2f}".ljust(16) for i in range(len(shown))]
        print("    " + "  |  ".join(captions))
        print("    " + "  |  ".join(dists) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentspace", description="Learn compact latent spaces and search them fast."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, SIMD level, threads, CUDA build and GPUs")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")
    info.set_defaults(run=_command_info)

    demo = sub.add_parser("demo", help="index the bundled handwritten digits and show neighbours")
    demo.add_argument("-k", type=int, default=10, help="neighbours per digit (default 10)")
    demo.add_argument("--examples", type=int, default=3, help="digits to show (default 3)")
    demo.add_argument("--show", type=int, default=4, help="neighbours drawn per digit (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="which digits are shown (default 0)")
    demo.add_argument("--threads", type=int, default=None, help="threads (default: OpenMP's)")
    demo.set_defaults(run=_command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"latentspace {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
