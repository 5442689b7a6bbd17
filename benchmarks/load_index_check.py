"""What load_index's check of the stored rows costs (a file holding a row add() refuses is
refused at load with verify=True): load times of one index file with the check, without it
(the check stubbed out), and with verify=False, best of 3, from the page cache.

    python benchmarks/load_index_check.py [--rows 1000000] [--dim 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import latentspace as ls
from latentspace.indexes import flat

from _timing import best_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.lsidx"
        index = ls.FlatIndex(args.dim)
        index.add(np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32))
        index.save(path)
        del index
        checked = best_seconds(lambda: ls.load_index(path), 3)
        unverified = best_seconds(lambda: ls.load_index(path, verify=False), 3)
        real = flat._refuse_rows_add_refuses
        flat._refuse_rows_add_refuses = lambda *_: None
        try:
            unchecked = best_seconds(lambda: ls.load_index(path), 3)
        finally:
            flat._refuse_rows_add_refuses = real
    print(f"{args.rows:,} x {args.dim}: verify=True {checked:.3f} s, without the row check {unchecked:.3f} s, "
          f"verify=False {unverified:.3f} s (best of 3)")


if __name__ == "__main__":
    main()
