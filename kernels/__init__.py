"""Triton kernels of rlcs_fast, imported as ``rlcs_fast.kernels``.

Why this folder sits at the repository root, how it becomes that subpackage, and why it steps aside when
imported as a top-level ``kernels``: the docstring of ``rlcs_fast/__init__.py``.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # the import system returns what sys.modules holds after exec
        _spec.loader.exec_module(_real)
else:
    from .fused_linear_grpo_loss import fused_linear_grpo_loss, fused_linear_grpo_loss_reference
    from .fused_linear_logprob import fused_linear_logprob, fused_linear_logprob_reference
    from .grpo_loss import grpo_loss, grpo_loss_reference

    __all__ = [
        "fused_linear_grpo_loss",
        "fused_linear_grpo_loss_reference",
        "fused_linear_logprob",
        "fused_linear_logprob_reference",
        "grpo_loss",
        "grpo_loss_reference",
    ]
