"""Fixtures of the test suite.

The environment set-up that must happen before ``mrcnn_edu`` is imported (Numba's CUDA simulator
without a GPU, ``MRCNN_EDU_QUICK=1``) is in the repository's root ``conftest.py``, so that it also
applies to the doctests pytest collects from the ``mrcnn_edu`` modules.
"""
