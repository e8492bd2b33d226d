"""Interoperability with other frameworks: ONNX import (:func:`from_onnx`) and export
(:func:`to_onnx`, :func:`dnnz_to_onnx`). Needs the optional ``onnx`` package
(``pip install 'dnnpar[onnx]'``), imported only when one of these is called."""
from .onnx import SUPPORTED_OPERATORS, SUPPORTED_OPSETS, dnnz_to_onnx, from_onnx, to_onnx  # noqa: F401

__all__ = ["from_onnx", "to_onnx", "dnnz_to_onnx", "SUPPORTED_OPERATORS", "SUPPORTED_OPSETS"]
