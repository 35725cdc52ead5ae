"""`minidiff.load`: a model folder, a Hugging Face hub id, or the embedded default model -> `Model`."""

from __future__ import annotations

from pathlib import Path

from .backend import get_xp
from .config import load_config
from .errors import MinidiffError
from .model import Model
from .weights import load_text_weights, open_checkpoint

DEFAULT_MODEL = Path(__file__).parent / "default_model"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve(path_or_hub_id=None) -> Path:
    """A local folder for `path_or_hub_id` (None, or the name "default", = the embedded default model).

    An existing folder wins (a folder called `default` too). Anything else is treated as a hub id and
    fetched (text files and safetensors only) through huggingface_hub, which honours HF_HOME and
    HF_HUB_OFFLINE=1.
    """
    if path_or_hub_id is None or (str(path_or_hub_id) == "default" and not Path("default").is_dir()):
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise MinidiffError(f"the embedded default model is missing from {DEFAULT_MODEL}")
        return DEFAULT_MODEL
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_hub_id)
    if not p.exists() and (s.startswith((".", "/", "~")) or s.count("/") > 1):
        raise MinidiffError(f"{s}: no such folder")
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise MinidiffError(f"{s}: not a model folder (and not a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=s, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, network...
        raise MinidiffError(f"{s}: could not fetch from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def load(path_or_hub_id=None, device: str = "cpu", precision: str = "fp32") -> Model:
    """Load DiffusionGemma text weights from a folder or hub id; None = the embedded default model.

    The large tensors (embedding, experts) stay in their stored precision, memory-mapped, and are widened
    to float32 per use (tensors.py); everything else is float32. On device "cuda" the weights stay compact
    on the GPU (bf16 words, packed int4: gpu.py). precision "fp32" computes as on the CPU (the same
    trajectories); "bf16" runs the experts on the grouped tensor-core kernels with bf16 activations.

    This is the one place a backend is chosen: each weight gets the products its device offers for it
    (ops.py's docstring has the protocol the model asks them by).
    """
    folder = resolve(path_or_hub_id)
    xp = get_xp(device)
    cfg = load_config(folder)
    weights = load_text_weights(open_checkpoint(folder), cfg)
    if xp.__name__ != "numpy":
        from .gpu import to_device            # device weights: bf16 GEMMs and the MoE kernels in "bf16"
        weights = {k: to_device(v, k, precision, xp) for k, v in weights.items()}
    elif precision != "fp32":
        raise MinidiffError(f"precision {precision!r} is for device 'cuda'; the CPU computes in float32")
    else:
        from .kernels import lowbit_matmul    # 4-bit weights: the CPU kernel, where it builds and applies
        for w in weights.values():
            lowbit_matmul.bind(w)
    return Model(cfg, weights, folder=folder, xp=xp)
