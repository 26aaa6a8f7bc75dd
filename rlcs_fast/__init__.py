"""rlcs_fast: a lean, fast SFT + GRPO trainer for Qwen2.5-VL (RL with Cold Start, arXiv 2505.22334).

How the kernels are packaged (the one place this is explained; tests/test_packaging.py checks every case).
The Triton kernels sit in the repository's top-level ``kernels/`` folder, as users asked, and are the
subpackage ``rlcs_fast.kernels``:

- ``pip install .`` copies the folder to ``rlcs_fast/kernels`` (``package-dir`` in pyproject.toml);
  ``pip install -e .`` maps it there (setuptools' editable finder).
- Run from the checkout root with a regular install (``python -m rlcs_fast.train`` puts the root first on
  ``sys.path``), Python imports the checkout's ``rlcs_fast/``, which holds no ``kernels``, and nothing
  maps it: the finder below points exactly ``rlcs_fast.kernels`` at the checkout's ``kernels/``. Without
  it that run stops at ``No module named 'rlcs_fast.kernels'``. A symlink ``rlcs_fast/kernels`` would do
  the same without code, but it breaks in checkouts without symlinks (Windows) and shows tools the tree
  twice; adding the root to ``__path__`` would also make ``rlcs_fast.tests``, ``rlcs_fast.bench``, ...
  importable.
- With the root on ``sys.path`` the folder is also a top-level package ``kernels``: the name of the
  Hugging Face package that transformers probes for hub kernels. Imported under that name,
  ``kernels/__init__.py`` hands the name over to an installed distribution ``kernels`` if there is one and
  otherwise stays empty, so transformers sees "not available" instead of our code.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_checkout_root, "kernels", "__init__.py")
):
    import importlib.abc as _abc
    import importlib.machinery as _machinery
    import sys as _sys

    class _CheckoutKernelsFinder(_abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != __name__ + ".kernels":
                return None
            return _machinery.PathFinder.find_spec(fullname, [_checkout_root])

    _sys.meta_path.append(_CheckoutKernelsFinder())
