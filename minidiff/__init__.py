"""minidiff: a minimal, exact NumPy/CuPy reference implementation of DiffusionGemma 26B-A4B.

    import minidiff
    model = minidiff.load("google/diffusiongemma-26B-A4B-it")   # or a folder; None = the embedded tiny model
    cache = model.encode(prompt_ids)
    logits = model.denoise(canvas_ids, cache)                    # [C, V] float32, softcapped
"""

from .errors import MinidiffError
from .loader import load
from .sampler import GenerationConfig, generate

__version__ = "0.1.0"
__all__ = ["load", "generate", "GenerationConfig", "MinidiffError", "__version__"]
