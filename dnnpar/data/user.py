"""User data sets (``--data file.npz``) and the image arrays ``dnnpar predict`` reads.

A data set is an ``.npz`` (``np.savez(path, x=x, y=y)``) with the members

- ``x``: images (N, C, H, W), N >= 1; float32 taken as it is, float64 cast to float32 (every
  value must stay finite), uint8 pixels scaled 0..255 -> 0..1 as the IDX loader does (and not
  standardised: float data is fed as the user prepared it, so that is the one scaling);
- ``y``: N integer labels (any signed or unsigned integer dtype, not bool) in ``0..classes-1``;
- optionally ``x_test`` / ``y_test`` (both or neither), the held-out split, same sample shape.
  Without them a fixed-seed 1/7 of the samples (at least one) is held out, the same split in
  every command, so ``dnnpar evaluate`` never scores images ``dnnpar train`` trained on.

Reading never trusts the file: members are read by :func:`dnnpar.nn.base.load_npz` (no pickle,
every ``.npy`` header checked against the bytes present before anything is allocated), and the
headers' dtypes and shapes, and their fit to the model (sample shape, when given), are checked
before the arrays are read. Labels are then checked against the model's class count. Every
problem is a :class:`~dnnpar.errors.DataError` naming the file and the member.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DataError
from .fashion_mnist import Dataset

MEMBERS = ("x", "y", "x_test", "y_test")
#: the seed of the held-out split when the file has no x_test / y_test: one split for every command
SPLIT_SEED = 0
TEST_FRACTION = 1 / 7
FASHION_SHAPE, FASHION_CLASSES = (1, 28, 28), 10
#: most elements a .npy input may hold (the same cap load_npz puts on an .npz member)
MAX_ELEMENTS = 2**30


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def model_signature(model) -> tuple[tuple | None, int | None]:
    """(sample shape (C, H, W) or None, class count or None) of a model: its ``input_shape`` and
    the length of its 1-D output. ValueError when the output is not one score per class."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None, None
    shape = tuple(int(d) for d in shape)
    out = tuple(model.output_shape(shape))
    if len(out) != 1:
        raise ValueError(f"{model.name} outputs {_dims(out)} per sample, not one score per class: it is not a "
                         "classifier dnnpar can train or score")
    return shape, int(out[0])


def fits_fashion_mnist(model) -> bool:
    """Whether the model takes Fashion-MNIST's 1x28x28 images and scores its 10 classes."""
    return model_signature(model) == (FASHION_SHAPE, FASHION_CLASSES)


def describe_model(model) -> str:
    """'NAME takes CxHxW images, K classes' (or that the model does not say)."""
    shape, classes = model_signature(model)
    if shape is None:
        return f"{model.name} (no input shape recorded)"
    return f"{model.name} takes {_dims(shape)} images and scores {classes} classes"


# ---------------------------------------------------------------------------- one array's rules
def check_images_header(shape, dtype, path, field: str, sample_shape=None, model_name: str = "the model") -> None:
    """An image array's header (before its data is read): (N, C, H, W) with every dimension
    >= 1, dtype float32, float64 or uint8, and samples of ``sample_shape`` when given."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None:
        raise DataError(f"holds {dtype} (Python objects or records); images are float32, float64 or uint8", path,
                        field)
    if not ((dtype.kind == "f" and dtype.itemsize in (4, 8)) or (dtype.kind == "u" and dtype.itemsize == 1)):
        raise DataError(f"is {dtype}; images are float32, float64 (cast to float32) or uint8 (scaled 0..255 -> "
                        "0..1)", path, field)
    if len(shape) != 4:
        raise DataError(f"has shape {tuple(shape)}; images are (N, C, H, W)", path, field)
    if min(shape) < 1:
        raise DataError(f"has shape {tuple(shape)}: every dimension must be >= 1", path, field)
    if sample_shape is not None and tuple(shape[1:]) != tuple(sample_shape):
        raise DataError(f"samples are {_dims(shape[1:])} (C x H x W), {model_name} takes {_dims(sample_shape)}",
                        path, field)


def to_float32(a: np.ndarray, path, field: str) -> tuple[np.ndarray, bool]:
    """(float32 images, came from uint8 pixels): uint8 scaled 0..255 -> 0..1, float64 cast;
    DataError when a value is NaN or infinite (or a float64 overflows float32)."""
    if a.dtype.kind == "u":
        return a.astype(np.float32) / np.float32(255.0), True
    with np.errstate(over="ignore"):
        x = a.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        i = int(np.argmin(finite.reshape(len(x), -1).all(axis=1)))
        bad = a.reshape(len(a), -1)[i][~finite.reshape(len(x), -1)[i]][0]
        what = "beyond float32's range" if np.isfinite(bad) else str(bad)
        raise DataError(f"sample {i} holds a value {what}: images must be finite", path, field)
    return x, False


def _check_labels_header(m, n: int, path, field: str, x_field: str) -> None:
    if m.dtype.kind not in "iu" or m.dtype.fields is not None:
        raise DataError(f"is {m.dtype}; labels are integers", path, field)
    if len(m.shape) != 1:
        raise DataError(f"has shape {m.shape}; labels are one integer per image, shape (N,)", path, field)
    if m.shape[0] != n:
        raise DataError(f"holds {m.shape[0]} labels for the {n} images of {x_field}", path, field)


def _labels(y: np.ndarray, classes: int | None, path, field: str, model_name: str) -> np.ndarray:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DataError(f"label {lo} is negative: labels are class indices 0..classes-1", path, field)
    if classes is not None and hi >= classes:
        raise DataError(f"label {hi} is outside 0..{classes - 1}: {model_name} scores {classes} classes", path,
                        field)
    return y.astype(np.int64)


def _data_error(e: CheckpointError, path) -> DataError:
    """The reader's CheckpointError (an unreadable archive or member) as this format's error."""
    msg = str(e)
    for prefix in (e.path, e.field):
        if prefix and msg.startswith(f"{prefix}: "):
            msg = msg[len(prefix) + 2:]
    field = e.field
    if field and field.startswith("member '") and field.endswith("'"):
        field = field[len("member '"):-1]
    msg = msg.replace("dnnpar .npz file", ".npz data set").replace("never writes pickles", "never reads pickles")
    return DataError(msg, path, field)


def _read_members(path, check) -> dict:
    """``load_npz`` with ``check(members)`` run on the headers; DataError for anything wrong."""
    from ..nn.base import load_npz

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data set file")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise DataError("is a single .npy array; a data set is an .npz holding x and y "
                            "(numpy.savez(path, x=images, y=labels))", path)
    found = []

    def run_check(members, p):  # load_npz turns a ValueError raised in here into its own error: hand it out
        try:
            return check(members)
        except DataError as e:
            found.append(e)
            return []

    try:
        arrays = load_npz(path, run_check)
    except CheckpointError as e:
        raise _data_error(e, path) from None
    if found:
        raise found[0]
    return arrays


# ---------------------------------------------------------------------------- data sets
def load_user_data(path, sample_shape=None, classes: int | None = None, model_name: str = "the model") -> Dataset:
    """The data set in the ``.npz`` at ``path`` as a :class:`Dataset` (float32 images, int64
    labels), checked against ``sample_shape`` (C, H, W) and ``classes`` when given (None: the
    largest label + 1). See the module docstring for the rules; DataError for a breach."""
    path = Path(path)

    def check(members):
        unknown = sorted(set(members) - set(MEMBERS))
        if unknown:
            raise DataError(f"unexpected member {unknown[0]!r}: a data set holds x, y and optionally x_test, y_test",
                            path, unknown[0])
        for k in ("x", "y"):
            if k not in members:
                raise DataError(f"missing (a data set holds x (N, C, H, W) images and y (N,) labels; found "
                                f"{', '.join(sorted(members)) or 'no members'})", path, k)
        if ("x_test" in members) != ("y_test" in members):
            have, lack = ("x_test", "y_test") if "x_test" in members else ("y_test", "x_test")
            raise DataError(f"missing: {have} is there, give both or neither", path, lack)
        splits = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in members else [])
        for xk, yk in splits:
            mx = members[xk]
            check_images_header(mx.shape, mx.dtype, path, xk, sample_shape, model_name)
            _check_labels_header(members[yk], mx.shape[0], path, yk, xk)
        if "x_test" in members and members["x_test"].shape[1:] != members["x"].shape[1:]:
            raise DataError(f"samples are {_dims(members['x_test'].shape[1:])}, those of x "
                            f"{_dims(members['x'].shape[1:])}", path, "x_test")
        if "x_test" not in members and members["x"].shape[0] < 2:
            raise DataError("holds 1 image: at least 2 are needed to hold some out for testing (or give x_test, "
                            "y_test)", path, "x")
        return [k for k in MEMBERS if k in members]

    arrays = _read_members(path, check)
    if classes is None:
        classes = 1 + max(int(arrays[k].max()) for k in ("y", "y_test") if k in arrays)
        classes = max(classes, 1)
    y = _labels(arrays["y"], classes, path, "y", model_name)
    x, _ = to_float32(arrays.pop("x"), path, "x")
    if "x_test" in arrays:
        y_test = _labels(arrays["y_test"], classes, path, "y_test", model_name)
        x_test, _ = to_float32(arrays.pop("x_test"), path, "x_test")
        return Dataset(x, y, x_test, y_test, str(path), classes=classes, name="data set")
    n = len(y)
    n_test = max(1, round(n * TEST_FRACTION))
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset(x[train], y[train], x[test], y[test], f"{path} (1/7 held out)", classes=classes, name="data set")


def load_for_model(path, model) -> Dataset:
    """:func:`load_user_data` checked against ``model``'s input shape and class count."""
    shape, classes = model_signature(model)
    return load_user_data(path, shape, classes, model.name)


# ---------------------------------------------------------------------------- prediction inputs
def read_npy_images(path, sample_shape=None, model_name: str = "the model") -> np.ndarray:
    """The image array of a ``.npy`` file (no pickle), its header checked (dtype, (N, C, H, W),
    sample shape, size against the bytes present) before the data is read."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f".npy format version {version} is not 1.0 or 2.0")
            shape, fortran, dtype = read[version](f)
        except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as e:
            raise DataError(f"bad .npy header ({e})", path, "header") from None
        if dtype.hasobject:
            raise DataError(f"holds Python objects ({dtype}); dnnpar never reads pickles", path, "x")
        check_images_header(shape, dtype, path, "x", sample_shape, model_name)
        count = int(np.prod(shape, dtype=object))
        if count > MAX_ELEMENTS:
            raise DataError(f"claims shape {tuple(shape)} ({count} elements, over the {MAX_ELEMENTS} limit)", path,
                            "x")
        offset = f.tell()
        size = path.stat().st_size
        if offset + count * dtype.itemsize != size:
            raise DataError(f"claims shape {tuple(shape)} of {dtype} ({count * dtype.itemsize} bytes), the file "
                            f"holds {size - offset}", path, "x")
        buf = f.read(count * dtype.itemsize)
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if fortran else "C")


def read_npz_images(path, sample_shape=None, model_name: str = "the model") -> np.ndarray:
    """The ``x`` member of an ``.npz`` (a data set or a file of images alone); other members
    are not read."""
    def check(members):
        if "x" not in members:
            raise DataError(f"missing: the images are the member x (found {', '.join(sorted(members)) or 'none'})",
                            path, "x")
        check_images_header(members["x"].shape, members["x"].dtype, path, "x", sample_shape, model_name)
        return ["x"]

    return _read_members(path, check)["x"]


def read_png(path, sample_shape=None, model_name: str = "the model") -> np.ndarray:
    """A grayscale or RGB PNG as a (1, C, H, W) uint8 array, through Pillow; its size and
    channels are checked against ``sample_shape`` before the pixels are decoded (no resizing,
    no colour conversion: a mismatch is a DataError)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading PNG images needs Pillow: pip install 'dnnpar[image]'", name="PIL") from None
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise DataError(f"is a {img.format} image, not a PNG", path, "format")
            if img.mode not in ("L", "RGB"):
                hint = {"RGBA": "drop the alpha channel", "LA": "drop the alpha channel"}.get(img.mode, "save it as "
                                                                                            "8-bit grayscale or RGB")
                raise DataError(f"mode {img.mode}: dnnpar reads 8-bit grayscale (L) or RGB PNGs ({hint})", path, "mode")
            c = 1 if img.mode == "L" else 3
            w, h = img.size
            if sample_shape is not None and (c, h, w) != tuple(sample_shape):
                raise DataError(f"is {_dims((c, h, w))} (C x H x W, {img.mode}), {model_name} takes "
                                f"{_dims(sample_shape)} (images are not resized or converted)", path, "size")
            if w * h * c > MAX_ELEMENTS:
                raise DataError(f"is {w}x{h}: over the {MAX_ELEMENTS}-element limit", path, "size")
            img.load()
            a = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise DataError(f"not a readable PNG ({e})", path) from None
    a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(a)


def read_idx_images(path, sample_shape=None, model_name: str = "the model") -> np.ndarray:
    """IDX images (N, H, W) (or one (H, W) image) as (N, 1, H, W) uint8."""
    from .idx import read_idx

    a = read_idx(path)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 3:
        a = a[:, None]
    check_images_header(a.shape, a.dtype, path, "images", sample_shape, model_name)
    return a


def read_images(path, sample_shape=None, model_name: str = "the model") -> tuple[np.ndarray, bool]:
    """(float32 (N, C, H, W) images, came from uint8 pixels) from a ``.npz`` (member x), ``.npy``,
    IDX (``.gz`` or not) or PNG file, told apart by their first bytes; uint8 pixels scaled
    0..255 -> 0..1. DataError (IDXError for IDX) for anything wrong, before a large allocation."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:2] == b"PK":
        a = read_npz_images(path, sample_shape, model_name)
    elif magic[:6] == b"\x93NUMPY":
        a = read_npy_images(path, sample_shape, model_name)
    elif magic == b"\x89PNG\r\n\x1a\n":
        a = read_png(path, sample_shape, model_name)
    elif magic[:2] == b"\x1f\x8b" or magic[:3] == b"\x00\x00\x08":
        if magic[:2] == b"\x1f\x8b" and path.suffix != ".gz":
            raise DataError("is gzip-compressed: name it .gz (a gzipped IDX file)", path)
        a = read_idx_images(path, sample_shape, model_name)
    else:
        raise DataError(f"starts with {magic[:8]!r}: not an .npz, .npy, IDX or PNG file", path, "format")
    return to_float32(a, path, "x")
