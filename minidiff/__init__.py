"""minidiff: a minimal, exact NumPy/CuPy reference implementation of DiffusionGemma 26B-A4B.

    import minidiff
    model = minidiff.load("google/diffusiongemma-26B-A4B-it")   # or a folder; None = the embedded default model
    cache = model.encode(prompt_ids)
    logits = model.denoise(canvas_ids, cache)                    # [C, V] float32, softcapped
"""

from .errors import MinidiffError

__version__ = "0.1.0"
__all__ = ["load", "generate", "GenerationConfig", "MinidiffError", "__version__"]


def __getattr__(name):
    """load / generate / GenerationConfig are imported on first use, so that `import minidiff.cli` (the
    command line's start-up) stays light and a Ctrl-C there is handled by the CLI, not a traceback."""
    if name == "load":
        from .loader import load
        return load
    if name in ("generate", "GenerationConfig"):
        from . import sampler
        return getattr(sampler, name)
    import importlib
    try:
        return importlib.import_module(f".{name}", __name__)   # a submodule: minidiff.loader, minidiff.model, …
    except ModuleNotFoundError:
        raise AttributeError(f"module 'minidiff' has no attribute {name!r}") from None
