"""Tensors in and out of Triton's Python backend stub through DLPack (copied beside every Python model's
``model.py`` of an exported repository; numpy only).

Why not ``Tensor.as_numpy()`` / ``Tensor(name, array)``: the stub of tritonserver 2.51 (PyTriton 0.7's) is built
against numpy 1, and with numpy 2 those two read and write zero bytes without an error (measured: every value 0).
DLPack works with numpy 1 and 2.
"""

import ctypes

import numpy as np

__all__ = ["to_numpy", "to_triton"]

# The stub renames a capsule it consumed "used_dlpack" instead of DLPack's "used_dltensor", so numpy's capsule
# destructor would report a ValueError for every tensor (the stub owns the tensor and frees it either way). We give
# the consumed capsule the standard name. The bytes must outlive every capsule: a module constant.
_USED_NAME = ctypes.c_char_p(b"used_dltensor")
_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name.restype = ctypes.c_int


def to_numpy(tensor) -> np.ndarray:
    """A Triton tensor (input, or a BLS response's output) as a numpy array of its own (a copy)."""
    return np.array(np.from_dlpack(tensor), copy=True)


def to_triton(tensor_type, name: str, array: np.ndarray):
    """``tensor_type.from_dlpack(name, array)`` (``tensor_type`` is ``pb_utils.Tensor``) without the stub's noise."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = tensor_type.from_dlpack(name, capsule)
    _set_name(capsule, _USED_NAME)
    return tensor
