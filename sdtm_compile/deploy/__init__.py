"""Deployment: ONNX bundles and their runner, and serving on Triton Inference Server.

* :mod:`.onnx`: :func:`export_onnx`, every engine of a compile as an ONNX graph, with a manifest;
* :mod:`.bundle`: what a bundle is and how it is read back (:func:`read_bundle`, :class:`BundleError`);
* :mod:`.runner`: :class:`OnnxTransformer`, an ONNX Runtime drop-in for ``pipe.transformer``;
* :mod:`.triton`: a Triton model repository from a bundle, a server launcher and a load test.
"""

from .bundle import FORMAT_VERSION, BundleError, read_bundle
from .onnx import export_onnx
from .runner import OnnxTransformer

__all__ = ["FORMAT_VERSION", "BundleError", "OnnxTransformer", "export_onnx", "read_bundle"]
