"""Model state as ``.safetensors`` (Hugging Face's format: a JSON header of names, dtypes, shapes
and byte offsets, then the raw tensors), in dnnpar's parameter names or in PyTorch's.

Needs the optional ``safetensors`` package (``pip install 'dnnpar[safetensors]'``), its NumPy API
only: PyTorch is never imported.

Names. ``names="dnnpar"`` uses :meth:`Graph.state_dict`'s names (``conv1.weight``,
``bn0.running_mean``); a PyTorch module whose attributes carry the dnnpar node names has exactly
these (``class LeNet5(nn.Module)`` with ``self.conv1``, ``self.conv2``, ``self.fc1``,
``self.fc2``, or ``nn.Sequential(OrderedDict(...))`` of those names). ``names="torch"`` uses the
names of the plain ``nn.Sequential(...)`` that lists the same layers in the same order: layer *i*
of ``model.layers`` becomes module ``str(i)``, so LeNet-5's ``conv1.weight`` is ``0.weight`` and
``fc2.bias`` is ``7.bias``. :func:`torch_definition` prints that PyTorch definition for any
Sequential (every zoo model is one); for :func:`dnnpar.nn.models.lenet5` it is::

    import torch.nn as nn
    model = nn.Sequential(
        nn.Conv2d(1, 20, kernel_size=5),         # 0: conv1
        nn.MaxPool2d(kernel_size=2, stride=2),   # 1: pool1
        nn.Conv2d(20, 50, kernel_size=5),        # 2: conv2
        nn.MaxPool2d(kernel_size=2, stride=2),   # 3: pool2
        nn.Flatten(),                            # 4: flatten
        nn.Linear(800, 500),                     # 5: fc1
        nn.ReLU(),                               # 6: relu1
        nn.Linear(500, 10),                      # 7: fc2
    )
    # train it, then: safetensors.torch.save_file(model.state_dict(), "lenet5.safetensors")

Layouts agree with PyTorch's without any transposition: Linear weights are (out, in), Conv2d
weights (out, in / groups, kh, kw), a depthwise conv is ``nn.Conv2d(c, c, k, groups=c)`` with
weights (c, 1, kh, kw), BatchNorm2d has ``weight``, ``bias``, ``running_mean``, ``running_var``.
PyTorch's ``num_batches_tracked`` (an int64 scalar) is written on save, in both spellings, so
``model.load_state_dict(strict=True)`` accepts the file, and ignored on load.

Dtypes. Parameters and buffers are float32. On load, float16 and float64 tensors are converted to
float32 (float64 values beyond float32's range are refused, not turned into inf); bfloat16 and
every non-float dtype are refused (convert with ``tensor.float()`` before saving).

Untrusted files. A file that the package cannot parse (bad header length, JSON, offsets that
overlap or leave the file, truncation) and a file whose names, shapes or dtypes do not fit the
model are one :class:`~dnnpar.errors.CheckpointError` each, raised before any parameter of the
model is written: the mismatch message lists every missing, unexpected and wrong-shaped name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

NAMES = ("dnnpar", "torch")
#: PyTorch's BatchNorm step counter: written for PyTorch, ignored by dnnpar
BN_COUNTER = "num_batches_tracked"
#: dtypes converted to float32 on load
_CONVERTIBLE = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_F32_MAX = float(np.finfo(np.float32).max)


def _safetensors():
    try:
        import safetensors.numpy  # noqa: F401
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("dnnpar.interop safetensors support needs the safetensors package: "
                          "pip install 'dnnpar[safetensors]'") from e
    return safetensors.numpy, safe_open


def _check_names_arg(names, allowed) -> str:
    if not isinstance(names, str) or names not in allowed:
        raise ValueError(f"names must be one of {', '.join(map(repr, allowed))}, got {names!r}")
    return names


def _check_model(model):
    from ..nn.base import Graph
    if not isinstance(model, Graph):
        raise TypeError(f"expected a dnnpar model (dnnpar.nn.Graph / Sequential), got {type(model).__name__}")


def _is_chain(model) -> bool:
    prev = model.input_name
    for lname, _ in model.layers:
        if model.inputs_of[lname] != [prev]:
            return False
        prev = lname
    return model.output == prev


def name_map(model, names: str = "torch") -> dict[str, str]:
    """{dnnpar name: file name} for every parameter and buffer of ``model``. ``"dnnpar"`` is the
    identity; ``"torch"`` numbers the layers as PyTorch's ``nn.Sequential`` does (``conv1.weight``
    -> ``0.weight``), and needs a chain-shaped model (a Sequential): a Graph with branches has no
    Sequential equivalent, save it with ``names="dnnpar"`` (the names of a PyTorch module whose
    attributes are named like the nodes)."""
    _check_model(model)
    _check_names_arg(names, NAMES)
    if names == "torch" and not _is_chain(model):
        raise ValueError(f"{model.name}: names='torch' numbers the layers of a PyTorch nn.Sequential, but this graph "
                         "is not a chain (it has branches); use names='dnnpar'")
    out = {}
    for i, (lname, layer) in enumerate(model.layers):
        prefix = str(i) if names == "torch" else lname
        for key in (*layer.params, *layer.buffers):
            out[f"{lname}.{key}"] = f"{prefix}.{key}"
    return out


def _bn_counters(model, names: str) -> list[str]:
    from ..nn.layers import BatchNorm2d
    return [f"{i if names == 'torch' else lname}.{BN_COUNTER}" for i, (lname, layer) in enumerate(model.layers)
            if isinstance(layer, BatchNorm2d)]


def save_safetensors(model, path, names: str = "dnnpar") -> None:
    """Write ``model``'s parameters and buffers (float32) to ``path`` as safetensors, named as
    ``names`` says (``"dnnpar"`` or ``"torch"``, see the module docstring), with an int64
    ``num_batches_tracked`` of 0 for each BatchNorm2d. The file is written to a temporary name and
    renamed: a reader never sees half a file. The header's metadata records the spelling."""
    st_np, _ = _safetensors()
    mapping = name_map(model, names)
    state = model.state_dict()
    tensors = {mapping[n]: np.ascontiguousarray(v, dtype=np.float32) for n, v in state.items()}
    tensors.update({c: np.zeros((), np.int64) for c in _bn_counters(model, names)})
    meta = {"format": "pt", "dnnpar.names": names, "dnnpar.model": str(model.name)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        st_np.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _header(path, safe_open):
    """{name: (dtype string, shape)} and the metadata of a safetensors file, nothing else read."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            info = {}
            for k in f.keys():
                sl = f.get_slice(k)
                info[k] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    except Exception as e:  # the package's SafetensorError, OSError, JSON/UTF-8 errors: all "not readable"
        raise CheckpointError(f"not a readable safetensors file (corrupt or truncated?): {type(e).__name__}: {e}",
                              path) from None
    return info, meta


def _choose_names(model, keys: set, meta: dict, names: str) -> str:
    if names != "auto":
        return names
    if meta.get("dnnpar.names") in NAMES and (meta["dnnpar.names"] != "torch" or _is_chain(model)):
        return meta["dnnpar.names"]
    candidates = ["dnnpar"] + (["torch"] if _is_chain(model) else [])
    overlap = {c: len(keys & set(name_map(model, c).values())) for c in candidates}
    return max(candidates, key=lambda c: overlap[c])  # ties: dnnpar, the first


def _shape_text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def load_safetensors(model, path, names: str = "auto") -> None:
    """Copy the tensors of a safetensors file into ``model`` (in place, on the active backend).

    ``names``: ``"dnnpar"``, ``"torch"`` (see the module docstring) or ``"auto"``: the spelling
    recorded by :func:`save_safetensors`, else the one that matches more of the file's names.
    Every parameter and buffer must be in the file once, with the model's shape, as float32 /
    float16 / float64; ``num_batches_tracked`` entries are ignored. Anything else is one
    :class:`CheckpointError` naming the file that lists all missing, unexpected and wrong-shaped
    or wrong-dtype names, raised after reading only the header, before the model changes.
    A missing file is FileNotFoundError."""
    _check_model(model)
    _check_names_arg(names, ("auto",) + NAMES)
    _, safe_open = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such safetensors file: {path}")
    info, meta = _header(path, safe_open)
    keys = {k for k in info if not k.rsplit(".", 1)[-1] == BN_COUNTER}
    spelling = _choose_names(model, keys, meta, names)
    mapping = name_map(model, spelling)  # dnnpar name -> file name
    want = {mapping[n]: (n, tuple(v.shape)) for n, v in
            [*((n, p) for n, p, _ in model.named_parameters()), *model.named_buffers()]}
    missing = [f for f in want if f not in keys]
    unexpected = sorted(keys - set(want))
    wrong = []
    for f, (_, shape) in want.items():
        if f not in info:
            continue
        dtype, fshape = info[f]
        if fshape != shape:
            wrong.append(f"{f} is {_shape_text(fshape)}, the model's {_shape_text(shape)}")
        elif dtype not in _CONVERTIBLE:
            hint = " (convert with tensor.float())" if dtype == "BF16" else ""
            wrong.append(f"{f} {dtype}, not a float32/float16/float64 tensor{hint}")
    if missing or unexpected or wrong:
        parts = [f"{label} {len(items)}: {', '.join(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", wrong)) if items]
        raise CheckpointError(f"does not fit {model.name} (names={spelling!r}): " + "; ".join(parts), path)
    state = {}
    try:
        with safe_open(str(path), framework="numpy") as fh:
            for f, (n, _) in want.items():
                state[n] = fh.get_tensor(f)
    except Exception as e:
        raise CheckpointError(f"not a readable safetensors file (corrupt or truncated?): {type(e).__name__}: {e}",
                              path) from None
    for n, v in state.items():
        if v.dtype == np.float64:
            finite = v[np.isfinite(v)]
            if finite.size and float(np.abs(finite).max()) > _F32_MAX:
                raise CheckpointError(f"float64 values beyond float32's range ({float(np.abs(finite).max()):.3g})",
                                      path, mapping[n])
        state[n] = v.astype(np.float32)
    model.load_state_dict(state)


_TORCH_ACT = {"ReLU": "nn.ReLU()", "ReLU6": "nn.ReLU6()", "Sigmoid": "nn.Sigmoid()", "Flatten": "nn.Flatten()",
              "Identity": "nn.Identity()", "HardSwish": "nn.Hardswish()", "HardSigmoid": "nn.Hardsigmoid()"}


def _torch_module(layer) -> str:
    t = type(layer).__name__

    def win(name, v, default=None):
        v = tuple(v)
        if default is not None and v == (default, default):
            return ""
        return f", {name}={v[0] if v[0] == v[1] else v}"

    if t in _TORCH_ACT:
        return _TORCH_ACT[t]
    if t in ("Conv2d", "PointwiseConv2d"):
        k = layer.kernel_size
        return (f"nn.Conv2d({layer.in_channels}, {layer.out_channels}, kernel_size={k[0] if k[0] == k[1] else k}"
                f"{win('stride', layer.stride, 1)}{win('padding', layer.padding, 0)}"
                f"{win('dilation', layer.dilation, 1)}"
                f"{f', groups={layer.groups}' if layer.groups != 1 else ''}{'' if layer.bias else ', bias=False'})")
    if t == "DepthwiseConv2d":
        k, c = layer.kernel_size, layer.channels
        return (f"nn.Conv2d({c}, {c}, kernel_size={k[0] if k[0] == k[1] else k}{win('stride', layer.stride, 1)}"
                f"{win('padding', layer.padding, 0)}, groups={c}{'' if layer.bias else ', bias=False'})")
    if t == "Linear":
        w = layer.params["weight"]
        return f"nn.Linear({w.shape[1]}, {w.shape[0]}{'' if 'bias' in layer.params else ', bias=False'})"
    if t == "BatchNorm2d":
        return (f"nn.BatchNorm2d({layer.channels}{'' if layer.eps == 1e-5 else f', eps={layer.eps}'}"
                f"{'' if layer.momentum == 0.1 else f', momentum={layer.momentum}'})")
    if t in ("MaxPool2d", "AvgPool2d"):
        k = layer.kernel_size
        extra = "" if t == "MaxPool2d" or getattr(layer, "count_include_pad", True) else ", count_include_pad=False"
        return (f"nn.{t}(kernel_size={k[0] if k[0] == k[1] else k}{win('stride', layer.stride)}"
                f"{win('padding', layer.padding, 0)}{extra})")
    if t == "GlobalAvgPool2d":
        return ("nn.AdaptiveAvgPool2d(1)" if layer.keepdims
                else "nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())")
    if t == "Dropout":
        return f"nn.Dropout({layer.p})"
    raise ValueError(f"torch_definition: no PyTorch module written for {t}")


def torch_definition(model) -> str:
    """PyTorch source of the ``nn.Sequential`` whose ``state_dict`` names are ``names="torch"``
    and whose layers compute what ``model``'s do (each dnnpar layer is one module, commented with
    its dnnpar name). ValueError for a graph with branches or a layer with no PyTorch module here."""
    name_map(model, "torch")  # the chain check
    lines = ["import torch.nn as nn", "", "model = nn.Sequential("]
    mods = [(i, lname, _torch_module(layer)) for i, (lname, layer) in enumerate(model.layers)]
    width = max(len(m) for _, _, m in mods) + 1
    lines += [f"    {(m + ','):<{width}}  # {i}: {lname}" for i, lname, m in mods]
    lines.append(")")
    return "\n".join(lines) + "\n"


__all__ = ["save_safetensors", "load_safetensors", "name_map", "torch_definition", "NAMES"]
