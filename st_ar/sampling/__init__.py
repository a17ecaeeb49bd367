from .generate import (
    apply_cfg,
    check_sampling_settings,
    compiled_decode_step,
    decode_one_token,
    filter_logits,
    generate,
    prefill,
    sample_logits,
    static_cache,
)
from .kv_cache import KVCache

__all__ = [
    "KVCache",
    "apply_cfg",
    "check_sampling_settings",
    "compiled_decode_step",
    "decode_one_token",
    "filter_logits",
    "generate",
    "prefill",
    "sample_logits",
    "static_cache",
]
