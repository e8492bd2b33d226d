"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT licence) from its standard gzip IDX files.

Where the full data set is looked for: ``data_dir`` (the ``--data-dir`` flag) if given, and
nowhere else (a folder that does not exist or lacks a file is a FileNotFoundError saying so);
otherwise, in order, the ``DNNPAR_DATA`` environment variable, ``~/.cache/dnnpar/fashion-mnist``,
and ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``).
The files are validated as Fashion-MNIST: (N, 28, 28) uint8 images, N uint8 labels in 0..9,
N >= 1 in each split; anything else is an :class:`~dnnpar.errors.IDXError` naming the file.
``subset="embedded"`` uses the 6,000 + 1,000 image class-balanced sample shipped inside the
package, so that demos and tests run offline anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IDXError
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
    """A labelled image set split in train and test: Fashion-MNIST (:func:`load`) or a user data
    set (:func:`dnnpar.data.user.load_user_data`). Labels lie in ``0..classes-1``."""
    x_train: np.ndarray   # (N, C, H, W) float32 (Fashion-MNIST: (N, 1, 28, 28), standardised)
    y_train: np.ndarray   # (N,) int64 in 0..classes-1
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    classes: int = len(CLASSES)
    name: str = "Fashion-MNIST"

    def __post_init__(self):
        if isinstance(self.classes, bool) or not isinstance(self.classes, (int, np.integer)) or self.classes < 1:
            raise ValueError(f"Dataset: classes must be an integer >= 1, got {self.classes!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype.kind != "f":
                raise TypeError(f"Dataset: x_{split} must be a float (N, C, H, W) array, got "
                                f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
            if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu":
                raise TypeError(f"Dataset: y_{split} must be a 1-D integer array, got "
                                f"{getattr(y, 'dtype', type(y).__name__)} of shape {getattr(y, 'shape', None)}")
            if len(x) != len(y):
                raise ValueError(f"Dataset: {len(x)} {split} images but {len(y)} labels")
            if y.size and (int(y.min()) < 0 or int(y.max()) >= self.classes):
                raise ValueError(f"Dataset: {split} labels must lie in 0..{self.classes - 1}, got "
                                 f"[{int(y.min())}, {int(y.max())}]")
        if self.x_train.shape[1:] != self.x_test.shape[1:] and len(self.x_test):
            raise ValueError(f"Dataset: train samples are {self.x_train.shape[1:]}, test samples "
                             f"{self.x_test.shape[1:]}")
        if not len(self.y_train):
            raise ValueError("Dataset: the training split is empty")

    @property
    def sample_shape(self) -> tuple:
        """(C, H, W) of one sample."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def __repr__(self):
        return f"<{self.name} {len(self.y_train)} train / {len(self.y_test)} test from {self.source}>"


def search_path(data_dir=None) -> list[Path]:
    """The folders :func:`locate` looks in: ``data_dir`` alone when given, else the defaults."""
    if data_dir:
        return [Path(data_dir)]
    places = []
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
    """The first folder of :func:`search_path` holding all four files; FileNotFoundError saying
    where it looked (or what ``data_dir`` lacks) and how to get the data."""
    places = search_path(data_dir)
    for folder in places:
        if all(_find(folder, stem) for stem in FILES.values()):
            return folder
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST not found: --data-dir {folder} is not a folder. To fix: {HOW_TO_GET}.")
        missing = ", ".join(f"{stem}(.gz)" for stem in FILES.values() if not _find(folder, stem))
        raise FileNotFoundError(f"Fashion-MNIST not found in --data-dir {folder}: missing {missing}. To fix: "
                                f"{HOW_TO_GET}.")
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
    arrays, paths = {}, {}
    for key, stem in FILES.items():
        path = paths[key] = _find(folder, stem)
        if path is None:
            raise FileNotFoundError(f"{folder}: missing {stem}(.gz). {HOW_TO_GET}.")
        arrays[key] = read_idx(path, expect_ndim=3 if key.endswith("_x") else 1)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        px, py = paths[f"{split}_x"], paths[f"{split}_y"]
        if x.shape[1:] != (28, 28):
            raise IDXError(f"{split} images are {x.shape[1]}x{x.shape[2]}, Fashion-MNIST's are 28x28", px, "dimensions")
        if len(x) == 0:
            raise IDXError(f"the {split} split holds no images", px, "dimensions")
        if len(x) != len(y):
            raise IDXError(f"{len(x)} {split} images in {px.name} but {len(y)} labels", py, "dimensions")
        if y.max() > 9:
            raise IDXError(f"{split} label {int(y.max())} is outside 0..9", py, "labels")
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
