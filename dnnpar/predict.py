"""``dnnpar predict``: the top-k classes, with probabilities, a model gives the images of a file.

    dnnpar predict checkpoints/lenet5.npz shoe.png images.npy --top-k 3

The model is a checkpoint (``.npz`` from ``dnnpar train`` / ``dnnpar import``), a ``.dnnz``
(run from its compressed form) or an ``.onnx`` file, told apart by their first bytes. The
images are read by :func:`dnnpar.data.user.read_images` (``.npz`` member x, ``.npy``, IDX,
PNG), checked against the model's input shape before they are read in full (never resized).
"""
from __future__ import annotations

import numpy as np

from .data import fashion_mnist, user

#: images per forward pass: bounds the activations' memory whatever the file holds
BATCH = 256


def load_model(path):
    """The model in ``path``, in eval mode: a checkpoint (zip magic), a .dnnz (its magic), else
    an ONNX file. Each format's own error (CheckpointError, DnnzError, OnnxError) when it is bad."""
    return load_model_and_data(path)[0]


def load_model_and_data(path):
    """(model in eval mode, what it was trained on): "user" when the file records a ``--data``
    set, "fashion-mnist" when it records Fashion-MNIST, None when it says nothing (ONNX)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        from .checkpoint import build_model_from, read_meta
        model = build_model_from(path)
        meta = read_meta(path)  # epoch 0: never trained here (an import), so it says nothing
        trained_on = "user" if meta.config.get("data_file") else "fashion-mnist" if meta.epoch else None
    elif magic == b"DNNZ":
        from .compress.pipeline import load, read_codes
        model = load(path)
        meta = read_codes(path)[0].get("meta")
        meta = meta if isinstance(meta, dict) else {}
        trained_on = "user" if meta.get("data_file") else "fashion-mnist" if meta.get("data") else None
    else:
        from .interop import from_onnx
        model, trained_on = from_onnx(path), None
    model.eval()
    return model, trained_on


def class_names(model, classes: int) -> list[str]:
    """Fashion-MNIST's names for a model of its shape (1x28x28 images, 10 classes), else indices."""
    if user.fits_fashion_mnist(model):
        return list(fashion_mnist.CLASSES)
    return [str(i) for i in range(classes)]


def probabilities(model, x: np.ndarray) -> np.ndarray:
    """Softmax of the model's scores, (N, classes) float64, computed in batches of BATCH.
    FloatingPointError when the model gives a score that is not finite."""
    from .backend import get_backend

    be = get_backend()
    out = []
    for s in range(0, len(x), BATCH):
        logits = be.to_numpy(model.forward(be.asarray(np.ascontiguousarray(x[s:s + BATCH])))).astype(np.float64)
        if logits.ndim != 2:
            raise ValueError(f"{model.name} outputs shape {logits.shape[1:]} per image, not one score per class")
        if not np.isfinite(logits).all():
            i = s + int(np.argmin(np.isfinite(logits).all(axis=1)))
            raise FloatingPointError(f"{model.name} gives a score that is not finite for image {i}")
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(out)


def top_k(p: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices by falling probability (ties: the lower index first)."""
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


def _ordinal(i: int) -> str:
    return f"{i}{'st' if i == 1 else 'nd' if i == 2 else 'rd' if i == 3 else 'th'}"


def predict_files(model, paths, k: int, normalize: str = "auto", trained_on: str | None = None) -> tuple[str, list[dict]]:
    """(table, rows) for the images in ``paths``: a row per image, its top ``k`` classes and
    probabilities. ``normalize`` (for uint8 pixels, which are first scaled to 0..1): "unit"
    keeps 0..1, "fashion-mnist" standardises with Fashion-MNIST's mean and std as training on
    it does, "auto" picks unit for a model ``trained_on`` a user's data set (whose uint8 pixels
    were scaled to 0..1, never standardised), else fashion-mnist for a model of Fashion-MNIST's
    shape, else unit. The table's first line says which was applied.
    ValueError (``k`` above the class count, an unknown ``normalize``) before any file is read."""
    if normalize not in ("auto", "fashion-mnist", "unit"):
        raise ValueError(f"normalize {normalize!r}: 'auto', 'fashion-mnist' or 'unit'")
    shape, classes = user.model_signature(model)
    if classes is not None and k > classes:
        raise ValueError(f"--top-k {k}: {model.name} scores {classes} classes")
    if normalize == "auto":
        normalize = "fashion-mnist" if trained_on != "user" and user.fits_fashion_mnist(model) else "unit"
    images = []
    for path in paths:  # every file is read and checked before the model runs on any
        x, from_pixels = user.read_images(path, shape, model.name)
        if from_pixels and normalize == "fashion-mnist":
            x = (x - np.float32(fashion_mnist.MEAN)) / np.float32(fashion_mnist.STD)
        images.append((str(path), x))
    rows, lines = [], []
    for path, x in images:
        p = probabilities(model, x)
        if k > p.shape[1]:
            raise ValueError(f"--top-k {k}: {model.name} scores {p.shape[1]} classes")
        names = class_names(model, p.shape[1])
        for i, best in enumerate(top_k(p, k)):
            top = [{"class": int(c), "name": names[c], "probability": float(p[i, c])} for c in best]
            rows.append({"input": path, "image": i, "top": top})
            lines.append([path, str(i)] + [f"{t['name']} {100 * t['probability']:.2f}%" for t in top])
    head = ["input", "image"] + [_ordinal(j) for j in range(1, k + 1)]
    widths = [max(len(r[j]) for r in [head] + lines) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    how = ("uint8 pixels scaled to 0..1 and standardised as Fashion-MNIST training does" if normalize == "fashion-mnist"
           else "uint8 pixels scaled to 0..1")
    table = "\n".join([f"inputs: {how}; float arrays as given (--normalize to choose)", fmt(head),
                       "-" * len(fmt(head))] + [fmt(r) for r in lines])
    return table, rows
