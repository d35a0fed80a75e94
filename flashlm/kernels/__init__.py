"""Numba kernels over numpy arrays: matmul per weight format, norms, rope, attention.

Import the modules by name: ``flashlm.kernels.matmul`` (``matmul``, ``dequantize``),
``flashlm.kernels.ops``, ``gemv_basic``, ``gemv_kquant``. Nothing is re-exported
here, so that ``from flashlm.kernels import matmul`` is always the module.
"""
