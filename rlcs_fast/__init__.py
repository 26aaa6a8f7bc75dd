"""rlcs_fast: a lean, fast SFT + GRPO trainer for Qwen2.5-VL (RL with Cold Start, arXiv 2505.22334)."""

import os as _os

__version__ = "0.1.0"

# Installed, the kernels are the subpackage rlcs_fast/kernels. Imported straight from a source checkout
# (the repo root on sys.path, e.g. `python -m rlcs_fast.train` from the root with a regular
# `pip install .`: the checkout shadows the installed copy) they sit beside this folder in kernels/; the
# editable install maps them, nothing else does, so point the package's search path at exactly that folder.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")):
    _checkout_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
    if _os.path.isfile(_os.path.join(_checkout_kernels, "__init__.py")):
        import importlib.abc as _abc
        import importlib.util as _util
        import sys as _sys

        class _CheckoutKernelsFinder(_abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if fullname != __name__ + ".kernels":
                    return None
                return _util.spec_from_file_location(fullname, _os.path.join(_checkout_kernels, "__init__.py"),
                                                     submodule_search_locations=[_checkout_kernels])

        _sys.meta_path.append(_CheckoutKernelsFinder())
