"""Pretrained weights in and out, quietly: how reelfarm calls ``from_pretrained`` and saves.

``from_pretrained`` loads safetensors only, never remote code, with the dtype under the keyword
this diffusers reads; ``quiet_progress_bars`` keeps diffusers' and transformers' progress bars
out of a job's log. Loading a pipeline, saving a tiny twin and the CLIP scorer all use them;
they sit below those modules so none has to import another for them.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def from_pretrained(cls, folder: str, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` from safetensors only, no remote code, in ``dtype``, with no
    progress bars and none of diffusers' deprecation warnings about the dtype keyword."""
    kwargs[dtype_keyword()] = dtype
    with quiet_progress_bars():
        return cls.from_pretrained(folder, use_safetensors=True, trust_remote_code=False, **kwargs)


def dtype_keyword() -> str:
    """The keyword ``from_pretrained`` takes the dtype by.

    diffusers 0.40 added ``dtype=`` and deprecated ``torch_dtype=`` (a FutureWarning on every
    load); up to 0.39 only ``torch_dtype=`` works, and ``dtype=`` is ignored with a logged
    warning, so the weights would load in float32 (read in the wheels of 0.35.2 to 0.42.1).
    """
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"


@contextlib.contextmanager
def quiet_progress_bars():
    """No progress bars from diffusers and transformers (loading components, writing shards)
    for the block; they are as they were after it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging)
                 if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()
