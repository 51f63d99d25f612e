"""composer: LoRA-Composer (training-free multi-concept composition) on a from-scratch SD1.5 stack.

    pipe = composer.load("stable-diffusion-v1-5/")            # diffusers folder or single file
    img = pipe.generate("a red fox in snow", seed=7)          # text to image
    imgs = pipe.generate("a red fox in snow", seed=[7, 8, 9])  # three seeds as one batch (a list of images)
    img = composer.compose(pipe, {"prompt": ..., "regions": [...]})   # multi-concept composition
"""
__version__ = "0.1.0"  # first: submodules record it in image metadata

from .compose import ComposeSpec, Region, compose, compose_latents
from .loading import load
from .pipeline import Pipeline

__all__ = ["load", "Pipeline", "compose", "compose_latents", "ComposeSpec", "Region"]
