"""The sampler's settings: `GenerationConfig`, read from a model folder's generation_config.json,
validated, and resolved against the caller's overrides (what `sampler.generate` runs with).

The names and defaults are the reference's (transformers 5.23.0, `DiffusionGemmaGenerationMixin`);
docs/sampler.md says what each one does to a generation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import MinidiffError
from .folder import ModelFolder

MAX_STEPS = 10_000   # denoising steps per canvas (the release uses 48)


@dataclass
class GenerationConfig:
    """The sampler's knobs, with the reference's names and defaults (HF `_get_default_generation_params`).

    Resolution order (last wins): these defaults < the model folder's `generation_config.json` (a null
    field there means "default") < a `GenerationConfig` passed to `generate` < keyword overrides.
    As in HF, an explicit `None` passed as an override switches a feature off: `t_min`/`t_max` None = no
    temperature (T = 1), `stability_threshold`/`confidence_threshold` None = no adaptive stopping
    (exactly `max_denoising_steps` steps per canvas).
    """
    max_new_tokens: int = 256               # canvases = ceil(max_new_tokens / C); never trimmed below whole canvases
    max_length: int | None = None           # HF quirk: used only when max_new_tokens == 256 (then = max_length - P)
    max_denoising_steps: int = 48           # N: forward passes per canvas at most
    entropy_bound: float = 0.1              # acceptance budget in nats (HF: sampler_config.entropy_bound)
    t_min: float | None = 0.4               # temperature end point (never reached: T(1) = t_min + (t_max - t_min)/N)
    t_max: float | None = 0.8               # temperature at the first step
    stability_threshold: int | None = 1     # argmax must equal the previous s argmax canvases ...
    confidence_threshold: float | None = 0.005   # ... and mean entropy < this, to stop early
    eos_token_id: list[int] | None = None   # stop ids; None = the model config's eos ids
    pad_token_id: int | None = None         # fills a canvas after its first stop id; None = model config's pad
    seed: int | None = None                 # numpy.random.default_rng(seed); None = a fresh seed (reported back)
    greedy: bool = False                    # extra (not in HF): T = 0 limit, sample = argmax, every position accepted
    self_conditioning_dtype: str = "auto"   # "bfloat16" | "float32" | "auto" (= the checkpoint's stored dtype, as HF)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, where: str = "generation_config.json") -> "GenerationConfig":
        """Parse an HF `generation_config.json` dict; null fields and unknown keys keep the defaults."""
        if not isinstance(d, dict):
            raise MinidiffError(f"{where}: top level must be a JSON object")
        kw = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key == "sampler_config" and value is not None:
                if not isinstance(value, dict):
                    raise MinidiffError(f"{where}: sampler_config must be an object")
                cls_name = value.get("_cls_name", "EntropyBoundSamplerConfig")
                if cls_name != "EntropyBoundSamplerConfig":
                    raise MinidiffError(f"{where}: sampler_config {cls_name!r} is not supported "
                                        "(only EntropyBoundSamplerConfig)")
                if value.get("entropy_bound") is not None:
                    kw["entropy_bound"] = value["entropy_bound"]
            elif key in names and value is not None:
                kw[key] = value
        return cls(**kw).validated(where)

    @classmethod
    def from_model_folder(cls, folder) -> "GenerationConfig":
        """Defaults overlaid with `folder/generation_config.json` when the file exists."""
        if folder is None or not os.path.isdir(folder):
            return cls()
        d = ModelFolder(folder)
        if not d.has("generation_config.json"):
            return cls()
        return cls.from_dict(d.read_json("generation_config.json"), where=str(d.shown / "generation_config.json"))

    def replace(self, **overrides) -> "GenerationConfig":
        """A validated copy with `overrides` applied (an unknown name is an error)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise MinidiffError(f"unknown generation option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **overrides).validated()

    def validated(self, where: str = "generation option") -> "GenerationConfig":
        """Check every field (HF `validate` rules); return self with floats/ints/lists normalised."""
        def bad(name, must, v):
            raise MinidiffError(f"{where} {name} must be {must} (got {v!r})")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            bad("max_new_tokens", "a positive integer", self.max_new_tokens)
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length <= 0):
            bad("max_length", "a positive integer", self.max_length)
        if not is_int(self.max_denoising_steps) or not 0 < self.max_denoising_steps <= MAX_STEPS:
            bad("max_denoising_steps", f"an integer in [1, {MAX_STEPS}]", self.max_denoising_steps)
        if not is_num(self.entropy_bound) or not self.entropy_bound > 0 or not math.isfinite(self.entropy_bound):
            bad("entropy_bound", "a number > 0", self.entropy_bound)
        for name in ("t_min", "t_max"):
            v = getattr(self, name)
            if v is not None and (not is_num(v) or not v >= 0 or not math.isfinite(v)):
                bad(name, "a number >= 0", v)
        if self.t_min is not None and self.t_max is not None and not self.t_max > self.t_min:
            raise MinidiffError(f"{where} t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if self.stability_threshold is not None and (not is_int(self.stability_threshold) or self.stability_threshold < 0):
            bad("stability_threshold", "an integer >= 0", self.stability_threshold)
        # a window longer than the steps can never be met within a canvas, exactly like one of N: clamped
        stability = None if self.stability_threshold is None else min(int(self.stability_threshold),
                                                                        int(self.max_denoising_steps))
        if self.confidence_threshold is not None and (
                not is_num(self.confidence_threshold) or not self.confidence_threshold > 0
                or not math.isfinite(self.confidence_threshold)):
            bad("confidence_threshold", "a number > 0", self.confidence_threshold)
        eos = self.eos_token_id
        if eos is not None:
            eos = [eos] if is_int(eos) else eos
            if not isinstance(eos, (list, tuple)) or len(eos) > 1024 or not all(is_int(e) and e >= 0 for e in eos):
                bad("eos_token_id", "a token id or a list of token ids", self.eos_token_id)
            eos = [int(e) for e in eos]
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            bad("pad_token_id", "a token id", self.pad_token_id)
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            bad("seed", "an integer >= 0", self.seed)
        if not isinstance(self.greedy, (bool, np.bool_)):
            bad("greedy", "true or false", self.greedy)
        if not isinstance(self.self_conditioning_dtype, str) or \
                self.self_conditioning_dtype not in ("auto", "bfloat16", "float32"):
            bad("self_conditioning_dtype", "'auto', 'bfloat16' or 'float32'", self.self_conditioning_dtype)
        return dataclasses.replace(
            self, entropy_bound=float(self.entropy_bound),
            t_min=None if self.t_min is None else float(self.t_min),
            t_max=None if self.t_max is None else float(self.t_max),
            confidence_threshold=None if self.confidence_threshold is None else float(self.confidence_threshold),
            eos_token_id=eos, greedy=bool(self.greedy), stability_threshold=stability)

    @property
    def adaptive_stopping(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None


def resolve_config(model, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """defaults < model folder's generation_config.json < `config` < `overrides` (validated)."""
    if config is None:
        config = GenerationConfig.from_model_folder(getattr(model, "folder", None))
    return config.replace(**overrides)
