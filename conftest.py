"""Test-session set-up for ``tests/`` and the doctests of ``mrcnn_edu`` (``--doctest-modules``).

It lives at the repository root so that it runs before pytest imports any ``mrcnn_edu`` module,
for a test file or for the doctests of the module itself. Numba's CUDA simulator must be chosen
before ``numba.cuda`` is first imported, so it is switched on here when torch sees no GPU: the
numba.cuda kernels then run (slowly, on tiny inputs) on the CPU, which is how CI checks them.
``MRCNN_EDU_QUICK=1`` makes notebooks and benchmarks use tiny sizes. Fixtures of the suite
belong in ``tests/conftest.py``.
"""

import os

os.environ.setdefault("MRCNN_EDU_QUICK", "1")
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch missing is reported by the imports in the tests
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# With --doctest-modules pytest imports every .py file it collects, helper modules included.
# tests/browser/lab_page.py imports Playwright at its top, which only `make test-browser`
# installs (tests/browser/setup.sh), so plain `make test` must not import it; it has no
# doctests, and the browser tests import it inside the tests that use it.
collect_ignore = ["tests/browser/lab_page.py"]
# The conftest.py files are plugins, loaded by pytest on their own; collected as doctest modules
# too, tests/conftest.py and tests/browser/conftest.py (both module "conftest" in the default
# import mode) clash with "import file mismatch". They carry no doctests.
collect_ignore_glob = ["**/conftest.py"]
