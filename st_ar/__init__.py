"""ST-AR: self-guided training for LlamaGen-compatible autoregressive image generators."""

__version__ = "0.1.0"
