"""Serving on NVIDIA Triton Inference Server: a model repository from an exported bundle, a server launcher and
a load test.

- :func:`export_triton` (``sdtm-compile export-triton BUNDLE OUT``): the repository (engines + a Python BLS
  pipeline model that runs the sampling loop, CFG and the ``li`` state);
- :class:`TritonServer`: ``tritonserver`` in a subprocess on free ports, ready or a clear error;
- :mod:`sdtm_compile.deploy.triton.load`: concurrent clients (``tritonclient``, HTTP and gRPC) whose every response is
  checked against a reference output.
"""

from .repository import REPOSITORY_MANIFEST, RepositoryError, TritonSettings, export_triton, verify_repository
from .server import ServerStartError, ServerUnavailable, TritonServer, find_tritonserver

__all__ = [
    "REPOSITORY_MANIFEST",
    "RepositoryError",
    "ServerStartError",
    "ServerUnavailable",
    "TritonServer",
    "TritonSettings",
    "export_triton",
    "find_tritonserver",
    "verify_repository",
]
