"""Training loop (loop.py), resumable distributed sampler (sampler.py)."""


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the run stopped without overwriting the last checkpoint."""
