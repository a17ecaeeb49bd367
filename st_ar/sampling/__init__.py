from .generate import (
    apply_cfg,
    check_sampling_settings,
    decode_one_token,
    filter_logits,
    generate,
    prefill,
    sample_logits,
)
from .kv_cache import KVCache

__all__ = [
    "KVCache",
    "apply_cfg",
    "check_sampling_settings",
    "decode_one_token",
    "filter_logits",
    "generate",
    "prefill",
    "sample_logits",
]
