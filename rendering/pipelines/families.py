"""The supported pipeline families, in one list: adding a family is adding its module here.

Each family module declares ``ADAPTERS`` (one per diffusers pipeline class it drives), ``TINY``
(tiny random-weight twins by kind, built offline) and ``TINY_CONFIGS`` (each twin's pipeline
class and the VAE and denoiser configs its builder uses: shape facts without torch). The
registry (``rendering.pipelines``) gathers the adapters and ``tiny`` the twins, both from here,
so neither needs the other. Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from rendering.pipelines import cogvideox, i2vgenxl, ltx, modelscope, svd, text_to_image, wan

FAMILIES = (modelscope, wan, cogvideox, ltx, svd, i2vgenxl, text_to_image)
