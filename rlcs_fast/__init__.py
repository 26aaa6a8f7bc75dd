"""rlcs_fast: a lean, fast SFT + GRPO trainer for Qwen2.5-VL (RL with Cold Start, arXiv 2505.22334)."""

__version__ = "0.1.0"
