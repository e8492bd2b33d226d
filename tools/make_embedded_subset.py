"""Build dnnpar/data/embedded/: a class-balanced, seeded subset of the real Fashion-MNIST files
(600 training and 100 test images per class), in the original IDX format.

    python tools/make_embedded_subset.py [/usr/share/datasets/fashion-mnist]
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnnpar.data.idx import read_idx, write_idx  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
dst = Path(__file__).resolve().parents[1] / "dnnpar" / "data" / "embedded"
rng = np.random.default_rng(2016)
for split, per_class in (("train", 600), ("t10k", 100)):
    x = read_idx(src / f"{split}-images-idx3-ubyte.gz", 3)
    y = read_idx(src / f"{split}-labels-idx1-ubyte.gz", 1)
    pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))
    write_idx(dst / f"{split}-images-idx3-ubyte.gz", x[pick])
    write_idx(dst / f"{split}-labels-idx1-ubyte.gz", y[pick])
    print(split, len(pick), "images")
