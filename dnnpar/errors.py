"""The exceptions dnnpar raises for bad input: one class per kind of input, all documented.

Arguments and arrays given to ops and layers keep the builtin types callers already catch:

- ``TypeError``: a wrong kind of value (a list where an array is expected, float16 where the op
  computes in float32, a float where an int is needed);
- ``ValueError``: a right kind with a wrong value (a shape, a negative stride, a geometry whose
  index arithmetic does not fit the kernels' integer types);

Files are validated by what their headers *mean*, not only by their checksums, and every
violation is one ``FileFormatError`` subclass (itself a ``ValueError``) naming the file and the
field that is wrong:

- ``DnnzError``: a ``.dnnz`` compressed model;
- ``CheckpointError``: a ``.npz`` model / training checkpoint;
- ``IDXError``: an IDX (Fashion-MNIST) file;
- ``DataError``: a user data set (``--data file.npz``) or an image file given to ``dnnpar
  predict`` (.npz, .npy, PNG), naming the member (``x``, ``y_test``) that is wrong, including
  samples whose shape or labels do not fit the model;
- ``SpecError``: a graph spec (``Graph.spec()`` JSON, ``dnnpar.nn.graph_from_spec``), naming the
  field (``nodes[3].config.kernel_size``);
- ``OnnxError``: an ONNX model (file or ``ModelProto``) that is malformed or uses an operator or
  attribute dnnpar cannot represent.

A parallel run whose workers fail or die, or whose cluster goes away, raises ``ParallelError``
(a ``RuntimeError``) naming the worker and what it reported.

Nothing here imports the rest of the package, so every module can raise these.
"""
from __future__ import annotations


class FileFormatError(ValueError):
    """A file that is not what its format requires: truncated, corrupt, or with a header whose
    values are out of range or inconsistent. ``path`` and ``field`` say where (either may be None)."""

    kind = "file"

    def __init__(self, message: str, path=None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        where = f"{self.path}: " if self.path and not message.startswith(self.path) else ""
        what = f"{field}: " if field and not message.startswith(field) else ""
        super().__init__(f"{where}{what}{message}")


class DnnzError(FileFormatError):
    """A .dnnz file is malformed, truncated, corrupted, of an unsupported version, or describes a
    model that does not match its sections."""

    kind = ".dnnz"


class CheckpointError(FileFormatError):
    """A checkpoint (.npz) is not one dnnpar wrote or does not fit the model it is loaded into."""

    kind = "checkpoint"


class IDXError(FileFormatError):
    """An IDX file (or a data set built from IDX files) is malformed or holds values out of range."""

    kind = "IDX"


class DataError(FileFormatError):
    """A user data set or input image file is unreadable, holds the wrong kind of array (dtype,
    dimensions, non-finite values, labels out of range), or does not fit the model it is for."""

    kind = "data set"


class SpecError(FileFormatError):
    """A graph spec (dict or JSON) that does not describe a buildable model: unknown layer types,
    config keys or values of the wrong type or out of range, wiring to missing nodes, shapes that
    do not fit, or more parameters than the cap."""

    kind = "graph spec"


class OnnxError(FileFormatError):
    """An ONNX model is not a readable ModelProto (truncated, corrupt, external data, shapes out
    of range, a cycle or a missing input), or uses an operator or attribute with no dnnpar layer;
    ``field`` names the node, initializer or graph part that is wrong."""

    kind = "ONNX"


class ParallelError(RuntimeError):
    """A parallel run lost what it runs on: a worker process failed or died, every worker is
    gone, or the Ray cluster went away. ``detail`` keeps the worker's traceback, if any."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


__all__ = ["FileFormatError", "DnnzError", "CheckpointError", "IDXError", "DataError", "SpecError", "OnnxError",
           "ParallelError"]
