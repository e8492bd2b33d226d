"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT licence) from its standard gzip IDX files.

Where the full data set is looked for, in order: ``data_dir`` (the ``--data-dir`` flag), the
``DNNPAR_DATA`` environment variable, ``~/.cache/dnnpar/fashion-mnist``, and
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``).
``subset="embedded"`` uses the 6,000 + 1,000 image class-balanced sample shipped inside the
package, so that demos and tests run offline anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .idx import read_idx

FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# per-pixel statistics of the full training set, used to standardise every split
MEAN, STD = 0.2860, 0.3530
EMBEDDED = Path(__file__).with_name("embedded")
HOW_TO_GET = ("get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
              "/usr/share/datasets/fashion-mnist), or put the four files train-images-idx3-ubyte.gz, "
              "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
              "github.com/zalandoresearch/fashion-mnist into ~/.cache/dnnpar/fashion-mnist; "
              "or use --subset embedded for the small sample shipped with dnnpar")


@dataclass
class Dataset:
    x_train: np.ndarray   # (N, 1, 28, 28) float32, standardised
    y_train: np.ndarray   # (N,) int64 in 0..9
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def __repr__(self):
        return f"<Fashion-MNIST {len(self.y_train)} train / {len(self.y_test)} test from {self.source}>"


def search_path(data_dir=None) -> list[Path]:
    places = []
    if data_dir:
        places.append(Path(data_dir))
    if os.environ.get("DNNPAR_DATA"):
        places.append(Path(os.environ["DNNPAR_DATA"]))
    places += [Path.home() / ".cache" / "dnnpar" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    return places


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(data_dir=None) -> Path:
    """The first folder of :func:`search_path` holding all four files."""
    places = search_path(data_dir)
    for folder in places:
        if all(_find(folder, stem) for stem in FILES.values()):
            return folder
    looked = "\n  ".join(str(p) for p in places)
    raise FileNotFoundError(f"Fashion-MNIST not found. Looked in:\n  {looked}\nTo fix: {HOW_TO_GET}.")


def _standardise(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return (x - np.float32(MEAN)) / np.float32(STD)


def load(data_dir=None, subset: str = "full") -> Dataset:
    """Fashion-MNIST as float32 (N, 1, 28, 28) standardised images and int64 labels.

    subset: "full" (the 60,000 + 10,000 images, found through :func:`search_path`) or
    "embedded" (the sample inside the package)."""
    if subset == "embedded":
        folder = EMBEDDED
    elif subset == "full":
        folder = locate(data_dir)
    else:
        raise ValueError(f"unknown subset {subset!r}: 'full' or 'embedded'")
    arrays = {}
    for key, stem in FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise FileNotFoundError(f"{folder}: missing {stem}(.gz). {HOW_TO_GET}.")
        arrays[key] = read_idx(path, expect_ndim=3 if key.endswith("_x") else 1)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.shape[1:] != (28, 28):
            raise ValueError(f"{folder}: {split} images are {x.shape[1:]}, Fashion-MNIST's are 28x28")
        if len(x) != len(y):
            raise ValueError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
        if y.size and y.max() > 9:
            raise ValueError(f"{folder}: {split} label {int(y.max())} is outside 0..9")
    return Dataset(_standardise(arrays["train_x"]), arrays["train_y"].astype(np.int64),
                   _standardise(arrays["test_x"]), arrays["test_y"].astype(np.int64), str(folder))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0):
    """Mini-batches (x, y) over the whole set; the order is a permutation drawn from (seed, epoch),
    so an epoch can be replayed exactly (and a resumed run sees the same batches)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = len(y)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
