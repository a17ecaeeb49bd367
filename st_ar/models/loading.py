"""Reading checkpoint files safely and loading them strictly, with errors a person can act on.

LlamaGen checkpoints come in several wrappings: ``{"model": sd, "optimizer": ..., "args": Namespace}``
from its DDP trainer, a bare state dict from its FSDP trainer (XXL, 3B), and ``{"module": sd}`` /
``{"state_dict": sd}`` from other tools. Some carry tensors that are not weights (RoPE tables,
KV caches, causal masks). This module unwraps all of them and refuses anything that does not fit.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..runfolder import atomic_write

# Wrapper keys, in the order tried. "ema" comes last: we only use it when nothing else is there.
STATE_DICT_KEYS = ("model", "module", "state_dict", "ema")

# Tensors some LlamaGen files carry that are recomputed, not learned.
RUNTIME_KEY_PATTERN = re.compile(r"(^|\.)(freqs_cis|causal_mask|kv_cache\.[kv]_cache)$")

# Prefixes added by wrappers (DDP, torch.compile) that never belong to our module names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used for the model asked for; the message says why."""


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False, trust_hint: str = "--trust-checkpoint") -> Any:
    """Load a checkpoint file without executing arbitrary pickled code.

    ``weights_only=True`` refuses argparse.Namespace, which LlamaGen's trainers store under
    "args"; that one type is allow-listed. Anything else outside the safe set is refused with a
    message naming it, unless ``trust=True`` (the file comes from someone you trust). A file that
    is empty, truncated or not a torch checkpoint at all is a CheckpointError saying so.
    ``trust_hint`` is how the caller's command line turns trust on, named in that message.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    damage = _damage(path)
    if damage:
        raise CheckpointError(f"{path} {damage}; write it again, or pick another file")
    if trust:
        warnings.warn(f"loading {path} with unrestricted unpickling (trust=True)", stacklevel=2)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=_can_mmap(path))
        _allow_namespace()
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except (PermissionError, MemoryError):
        raise  # the file may be fine; the message from the OS says what is wrong
    except pickle.UnpicklingError as e:
        if not trust and _UNSAFE_GLOBAL.search(str(e)):
            raise CheckpointError(
                f"{path} holds Python objects outside the safe set, so it was not unpickled:\n  "
                f"{_refused_global(e)}\nIf you trust this file, load it with trust=True "
                f"(command line: {trust_hint})."
            ) from None
        raise _not_a_checkpoint(path, e) from None
    except Exception as e:  # torch.load fails on damaged files with EOFError, OSError, KeyError, ...
        raise _not_a_checkpoint(path, e) from None


# how torch words a weights_only refusal of a type (other unpickling errors mean a damaged file)
_UNSAFE_GLOBAL = re.compile(r"unsupported global", re.IGNORECASE)

_ZIP_MAGIC = b"PK\x03\x04"


def _damage(path: str) -> str | None:
    """What is visibly wrong with the file before unpickling: empty, or a zip checkpoint cut short."""
    if os.path.isdir(path):
        return "is a folder, not a checkpoint file"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes): it was not written completely"
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if _ZIP_MAGIC.startswith(head) and not _can_mmap(path):
        # torch.save's zip format keeps its index at the end of the file
        return (
            f"is truncated ({os.path.getsize(path)} bytes, the end of the file is missing): "
            "it was not written or copied completely"
        )
    return None


def _not_a_checkpoint(path: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable torch checkpoint (truncated, damaged, or not written by torch.save; "
        f"{_load_failure(e)}); write it again, or pick another file"
    )


def _load_failure(e: BaseException) -> str:
    # the useful part of torch's message; its weights_only errors open with a long preamble
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "the file ends too early" if isinstance(e, EOFError) else type(e).__name__
    return f"{type(e).__name__}: {lines[0][:200]}"


def _allow_namespace() -> None:
    # add_safe_globals exists from torch 2.4; it is process-wide, and Namespace holds only data.
    torch.serialization.add_safe_globals([argparse.Namespace])


def _can_mmap(path: str) -> bool:
    # mmap avoids a second copy of multi-GB files but only works on the zip format (torch >= 1.6).
    import zipfile

    return zipfile.is_zipfile(path)


def _refused_global(e: BaseException) -> str:
    # torch's message is long; the line naming the refused type is the useful one
    for line in str(e).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint to its state dict and drop non-weight tensors and wrapper prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, found {type(obj).__name__}")
    sd = None
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        sd = obj  # a bare state dict (FSDP checkpoints)
    else:
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if sd is None:
        raise CheckpointError(
            f"{source}: no state dict found; top-level keys are {sorted(map(str, obj.keys()))}, "
            f"expected one of {list(STATE_DICT_KEYS)} or a bare state dict"
        )
    clean = {}
    for name, tensor in sd.items():
        if not torch.is_tensor(tensor):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        for prefix in WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        if RUNTIME_KEY_PATTERN.search(name):
            continue
        clean[name] = tensor
    return clean


# Weight names only one of the two models has; ours and LlamaGen's name them alike.
_FAMILY_KEYS = {
    "VQ tokenizer": ("encoder.conv_in.weight", "quantize.embedding.weight"),
    "GPT": ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"),
}


def checkpoint_family(obj: Any) -> str | None:
    """The model a loaded checkpoint holds weights of, "GPT" or "VQ tokenizer"; None if neither.

    Lets a loader say "this is the other model" instead of a list of mismatched keys.
    """
    try:
        names = extract_state_dict(obj)
    except CheckpointError:
        return None
    for family, keys in _FAMILY_KEYS.items():
        if any(k in names for k in keys):
            return family
    return None


def load_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    explain: Callable[[Mapping[str, torch.Tensor]], list[str]] | None = None,
) -> None:
    """``model.load_state_dict(strict=True)`` with a readable error.

    ``explain`` turns the file's shapes into architecture facts (vocabulary, depth, width) that
    differ from the model, which says far more than a list of mismatched keys.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        lines = explain(state_dict) if explain is not None else []
        msg = [f"{source} does not fit the model:"]
        msg += [f"  - {line}" for line in lines]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                msg.append(f"  {title} keys: {shown}")
        raise CheckpointError("\n".join(msg))
    # copy values; file tensors may share one storage or be memory-mapped
    model.load_state_dict(state_dict, strict=True)


def checkpoint_args(obj: Any) -> dict[str, Any]:
    """The training arguments stored in a LlamaGen checkpoint ("args"), as a dict; {} if none."""
    if isinstance(obj, Mapping) and "args" in obj:
        args = obj["args"]
        if isinstance(args, argparse.Namespace):
            return vars(args)
        if isinstance(args, Mapping):
            return dict(args)
    return {}


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through ``atomic_write``: a crash leaves the old file or the new one, never half a
    file; a full disk raises NoSpaceError naming the folder and keeps the previous file."""
    atomic_write(path, lambda f: torch.save(obj, f))
