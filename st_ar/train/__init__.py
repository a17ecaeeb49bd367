"""Training: the GPT loop (loop.py) on the runtime both trainers share (runtime.py: precision,
parameter groups, finite-loss check, random streams, resume rules) and their batch order
(sampler.py)."""


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the run stopped without overwriting the last checkpoint."""
