"""Interoperability with other frameworks: ONNX import (:func:`from_onnx`) and export
(:func:`to_onnx`, :func:`dnnz_to_onnx`), and model state as safetensors in dnnpar's or PyTorch's
parameter names (:func:`save_safetensors`, :func:`load_safetensors`, :func:`torch_definition`).
The optional ``onnx`` / ``safetensors`` packages (``pip install 'dnnpar[onnx,safetensors]'``) are
imported only when one of these is called."""
from .onnx import SUPPORTED_OPERATORS, SUPPORTED_OPSETS, dnnz_to_onnx, from_onnx, to_onnx  # noqa: F401
from .safetensors import load_safetensors, name_map, save_safetensors, torch_definition  # noqa: F401

__all__ = ["from_onnx", "to_onnx", "dnnz_to_onnx", "SUPPORTED_OPERATORS", "SUPPORTED_OPSETS",
           "save_safetensors", "load_safetensors", "name_map", "torch_definition"]
