"""Which low-bit scheme a checkpoint's module is stored in, read from its config, and the loader hook.

compressed-tensors (config.json `quantization_config`, quant_method "compressed-tensors": config groups
with targets and ignores, exact names, `re:` patterns or the class name "Linear") and ModelOpt
(quant_method "modelopt", or hf_quant_config.json: quant_algo NVFP4 with exclusions) each say, per
module, which format of formats.py holds its weight. `load_quantized` reads a module's tensors in that
format, every name, dtype and shape checked. Patterns come from untrusted files: `_safe_regex` refuses
the ones that backtrack exponentially.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from pathlib import Path

import numpy as np

from .errors import MinidiffError
from .formats import NVFP4_GROUP, Int4Weight, NVFP4Weight, QuantExperts, QuantTensor

# ================================================================================================
# the quantization config: which scheme applies to which module
# ================================================================================================

CT_INT4_FORMATS = ("pack-quantized",)
CT_NVFP4_FORMATS = ("nvfp4-pack-quantized",)


MAX_PATTERN = 1000


def _match(name: str, target: str) -> bool:
    """compressed-tensors target matching: "re:<regex>" (re.match) or the exact module name; the
    class name "Linear" matches every module we are asked about (all of them are Linear layers)."""
    if target.startswith("re:"):
        return _safe_regex(target[3:]).match(name) is not None
    return target == name or target == "Linear"


@functools.lru_cache(maxsize=4096)
def _safe_regex(pattern: str):
    """Compile a regex from a config file, refusing the shapes that backtrack exponentially or with a high
    power of the name's length: a repeat whose body holds an unbounded repeat or an alternation, as in
    `(a+)+$`, `(a|aa)*$` or `(.*a){20}`, and more than 5 unbounded repeats in all (`.*a.*a.*a…`).
    Python's re has no time limit; the patterns of real checkpoints (`re:.*\\.router\\.proj$`) need none
    of these."""
    try:
        import re._parser as sre      # Python >= 3.11
        from re._constants import MAXREPEAT
    except ImportError:               # Python 3.10
        import sre_parse as sre
        from sre_constants import MAXREPEAT
    repeats = {sre.MAX_REPEAT, sre.MIN_REPEAT} | ({sre.POSSESSIVE_REPEAT} if hasattr(sre, "POSSESSIVE_REPEAT") else set())
    unbounded = 0

    def risky(items, in_repeat: bool) -> bool:
        nonlocal unbounded
        for op, av in items:
            if op in repeats:
                lo, hi, body = av
                unbounded += hi == MAXREPEAT
                if (in_repeat and hi == MAXREPEAT) or risky(body, in_repeat or hi > 1):
                    return True
            elif op == sre.BRANCH:
                if in_repeat or any(risky(b, in_repeat) for b in av[1]):
                    return True
            elif op == sre.SUBPATTERN:
                if risky(av[-1], in_repeat):
                    return True
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                if risky(av[1], in_repeat):
                    return True
        return False
    try:
        if len(pattern) > MAX_PATTERN or risky(sre.parse(pattern), False) or unbounded > 5:
            raise MinidiffError(f"quantization_config: pattern {pattern[:60]!r} could take exponential time "
                                "to match (nested, alternated or many unbounded repeats); refused")
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise MinidiffError(f"quantization_config: invalid pattern {pattern[:60]!r} ({e})")


class Scheme:
    """What the config says about one module: method ("int4" | "nvfp4-ct" | "nvfp4-modelopt"),
    group size, and where the config came from (for error messages)."""

    def __init__(self, method, group_size, source, strategy="group"):
        self.method, self.group_size, self.source, self.strategy = method, group_size, source, strategy


def _ct_scheme(cfg: dict, module: str, tensor: str, source: str) -> Scheme | None:
    """The compressed-tensors config group that applies to `module`, or None if it is ignored /
    targeted by no group."""
    groups = cfg.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise MinidiffError(f"{source}: quantization_config has no config_groups (needed for {tensor})")
    if any(_match(module, t) for t in _patterns(cfg, "ignore", source) if t != "Linear"):
        return None
    hits = [(k, g) for k, g in groups.items()
            if isinstance(g, dict) and any(_match(module, t) for t in _patterns(g, "targets", source))]
    if len(hits) > 1:  # compressed-tensors prefers exact names over regexes over class names
        exact = [h for h in hits if module in (h[1].get("targets") or [])]
        regex = [h for h in hits if any(t.startswith("re:") and _match(module, t) for t in h[1].get("targets"))]
        hits = exact or regex or hits
    if len(hits) != 1:
        if not hits:
            return None
        raise MinidiffError(f"{source}: config groups {[k for k, _ in hits]} all target {module} ({tensor})")
    key, group = hits[0]
    w = group.get("weights")
    if not isinstance(w, dict):
        raise MinidiffError(f"{source}: config group {key} has no weights scheme ({tensor})")
    fmt = group.get("format") or cfg.get("format")
    num_bits, typ = w.get("num_bits"), w.get("type")
    strategy, gs = w.get("strategy"), w.get("group_size")
    if fmt in CT_INT4_FORMATS:
        if num_bits != 4 or typ != "int":
            raise MinidiffError(f"{source}: {tensor}: unsupported pack-quantized scheme "
                                f"(num_bits {num_bits}, type {typ}); minidiff reads 4-bit int only")
        if w.get("symmetric") is False:
            raise MinidiffError(f"{source}: {tensor}: asymmetric int4 (weight_zero_point) is not supported")
        if strategy not in ("group", "channel"):
            raise MinidiffError(f"{source}: {tensor}: unsupported int4 strategy {strategy!r} (group, channel)")
        if w.get("actorder") not in (None, "static", "weight"):  # group actorder needs g_idx: unsupported
            raise MinidiffError(f"{source}: {tensor}: activation ordering {w.get('actorder')!r} is not supported")
        if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
            raise MinidiffError(f"{source}: {tensor}: group strategy needs a positive group_size, got {gs!r}")
        return Scheme("int4", gs if strategy == "group" else None, source, strategy)
    if fmt in CT_NVFP4_FORMATS:
        if num_bits != 4 or typ != "float" or (gs is not None and gs != NVFP4_GROUP):
            raise MinidiffError(f"{source}: {tensor}: unsupported nvfp4 scheme (num_bits {num_bits}, "
                                f"type {typ}, group_size {gs}); NVFP4 is 4-bit float in groups of 16")
        return Scheme("nvfp4-ct", NVFP4_GROUP, source)
    raise MinidiffError(f"{source}: {tensor}: unsupported compressed-tensors format {fmt!r} "
                        f"(minidiff reads pack-quantized int4 and nvfp4-pack-quantized)")


def _modelopt_cfg(ckpt, quantization_config) -> tuple[dict, str] | None:
    """The ModelOpt settings, from config.json (quant_method: modelopt) or hf_quant_config.json."""
    if isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "modelopt":
        q = quantization_config
        q = q.get("quantization", q)
        return (q, str(Path(getattr(ckpt, "folder", ".")) / "config.json")) if isinstance(q, dict) else None
    d = getattr(ckpt, "dir", None)
    if d is None or not d.has("hf_quant_config.json"):
        return None
    where = str(d.shown / "hf_quant_config.json")
    q = d.read_json("hf_quant_config.json")
    if not isinstance(q, dict) or not isinstance(q.get("quantization"), dict):
        raise MinidiffError(f"{where}: malformed (expected a JSON object with a 'quantization' object)")
    return q["quantization"], where


def _patterns(cfg: dict, key: str, source: str) -> list[str]:
    """A list of module-name patterns from a quantization config (absent = empty), type-checked."""
    v = cfg.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(p, str) and len(p) <= MAX_PATTERN for p in v) or len(v) > 10000:
        raise MinidiffError(f"{source}: {key} must be a list of module names or patterns "
                            f"(strings of at most {MAX_PATTERN} characters)")
    return v


def _modelopt_scheme(mo: dict, module: str, tensor: str, source: str) -> Scheme | None:
    # ModelOpt's own export and vLLM name the exclusions `ignore`; older files `exclude_modules`: both count
    for pat in _patterns(mo, "ignore", source) + _patterns(mo, "exclude_modules", source):
        if fnmatch.fnmatchcase(module, pat):
            return None
    algo = mo.get("quant_algo")
    if algo != "NVFP4":
        raise MinidiffError(f"{source}: {tensor}: unsupported ModelOpt quant_algo {str(algo)[:40]!r} (minidiff reads NVFP4)")
    gs = mo.get("group_size", NVFP4_GROUP)
    if gs != NVFP4_GROUP or isinstance(gs, bool):
        raise MinidiffError(f"{source}: {tensor}: NVFP4 group_size {str(gs)[:20]} (must be 16)")
    return Scheme("nvfp4-modelopt", NVFP4_GROUP, source)


# ================================================================================================
# the loader hook
# ================================================================================================

def _where(ckpt, name) -> str:
    try:
        return str(ckpt.file_of(name))
    except Exception:
        return str(getattr(ckpt, "folder", "checkpoint"))


def _stored_kind(ckpt, module: str) -> str | None:
    """What is stored under `module`: "ct" (weight_packed), "modelopt" (a U8 `weight` with a
    weight_scale), or None."""
    if ckpt.has(module + ".weight_packed"):
        return "ct"
    if ckpt.has(module + ".weight") and ckpt.dtype(module + ".weight") == "U8":
        return "modelopt"
    return None


def _scheme_for(ckpt, module, tensor, kind, quantization_config) -> Scheme:
    where = _where(ckpt, tensor)
    if kind == "modelopt":
        mo = _modelopt_cfg(ckpt, quantization_config)
        if mo is None:
            raise MinidiffError(f"{where}: {tensor} is stored as NVFP4 (U8) but neither config.json's "
                                f"quantization_config nor hf_quant_config.json describes it")
        s = _modelopt_scheme(mo[0], module, tensor, mo[1])
        if s is None:
            raise MinidiffError(f"{where}: {tensor} is stored quantized but {mo[1]} excludes {module}")
        return s
    q = quantization_config
    if not isinstance(q, dict):
        raise MinidiffError(f"{where}: {tensor} is stored quantized (weight_packed) but config.json has no "
                            f"quantization_config")
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise MinidiffError(f"{where}: {tensor}: unsupported quantization method {method!r} "
                            f"(minidiff reads compressed-tensors and modelopt)")
    s = _ct_scheme(q, module, tensor, f"{Path(getattr(ckpt, 'folder', '.')) / 'config.json'}")
    if s is None:
        raise MinidiffError(f"{where}: {tensor} is stored quantized but config.json's quantization_config "
                            f"does not target {module} (ignored or in no config group)")
    return s


def _load_2d(ckpt, module: str, shape: tuple, quantization_config, kind: str) -> QuantTensor:
    """One quantized [out, in] Linear stored under `module`, checked against the expected shape."""
    out, n = shape
    if kind == "ct":
        main = module + ".weight_packed"
        scheme = _scheme_for(ckpt, module, main, kind, quantization_config)
    else:
        main = module + ".weight"
        scheme = _scheme_for(ckpt, module, main, kind, quantization_config)
    where = _where(ckpt, main)

    def need(tname, dtypes, tshape=None):
        if not ckpt.has(tname):
            raise MinidiffError(f"{where}: {main} is stored quantized ({scheme.method}) but {tname} is missing")
        dt = ckpt.dtype(tname)
        if dt not in dtypes:
            raise MinidiffError(f"{_where(ckpt, tname)}: {tname} has dtype {dt}, expected {' or '.join(dtypes)}")
        sh = tuple(ckpt.shape(tname))
        if tshape is not None and sh != tuple(tshape):
            raise MinidiffError(f"{_where(ckpt, tname)}: {tname} has shape {list(sh)}, expected {list(tshape)} "
                                f"for a {scheme.method} weight of shape {[out, n]}"
                                + (f" with group_size {scheme.group_size} ({scheme.source})" if tname.endswith("_scale") else ""))
        return ckpt.raw(tname), dt, sh

    if scheme.method == "int4":
        if ckpt.has(module + ".weight_zero_point"):
            raise MinidiffError(f"{where}: {module}.weight_zero_point present, but the scheme is symmetric "
                                f"({scheme.source})")
        if ckpt.has(module + ".weight_g_idx"):
            raise MinidiffError(f"{where}: {module}.weight_g_idx (activation ordering) is not supported")
        if ckpt.has(module + ".weight_shape"):
            ws, _, wss = need(module + ".weight_shape", ("I64", "I32"))
            stored = tuple(int(v) for v in np.asarray(ws).reshape(-1))
            if stored != (out, n):
                raise MinidiffError(f"{_where(ckpt, module + '.weight_shape')}: {module}.weight_shape is "
                                    f"{list(stored)}, expected {[out, n]} from config.json")
        g = scheme.group_size if scheme.strategy == "group" else n
        if n % g:
            raise MinidiffError(f"{where}: {main}: in_features {n} is not a multiple of group_size {g} "
                                f"({scheme.source})")
        packed, _, _ = need(main, ("I32",), (out, -(-n // 8)))
        scale, sdt, _ = need(module + ".weight_scale", ("BF16", "F16", "F32"), (out, n // g))
        return Int4Weight(module + ".weight", packed, scale, sdt, (out, n), g, where)

    # NVFP4
    if n % NVFP4_GROUP:
        raise MinidiffError(f"{where}: {main}: in_features {n} is not a multiple of 16 (NVFP4)")
    packed, _, _ = need(main, ("U8",), (out, n // 2))
    scale, _, _ = need(module + ".weight_scale", ("F8_E4M3",), (out, n // NVFP4_GROUP))
    second = module + (".weight_global_scale" if scheme.method == "nvfp4-ct" else ".weight_scale_2")
    raw2, _, sh2 = need(second, ("F32",))
    if int(np.prod(sh2, dtype=np.int64)) != 1:
        raise MinidiffError(f"{_where(ckpt, second)}: {second} has shape {list(sh2)}, expected a single value")
    v2 = np.float32(np.asarray(raw2).reshape(-1)[0])
    if not np.isfinite(v2) or v2 <= 0:
        raise MinidiffError(f"{_where(ckpt, second)}: {second} = {float(v2)}, expected a positive finite scale")
    if scheme.method == "nvfp4-ct":
        return NVFP4Weight(module + ".weight", packed, scale, (out, n), global_scale=v2, where=where)
    return NVFP4Weight(module + ".weight", packed, scale, (out, n), scale_2=v2, where=where)


EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def load_quantized(ckpt, name: str, shape: tuple, quantization_config: dict | None) -> QuantTensor | None:
    """The loader hook: the dense weight `name` of `shape` read from its quantized tensors, or None
    if nothing quantized is stored under that name. Disagreements (shapes, dtypes, group size, scales,
    an unsupported method) raise MinidiffError naming the tensor and file.

    2-D Linear weights `M.weight` are read from M.weight_packed/… (compressed-tensors) or from a U8
    M.weight/… (ModelOpt); the fused 3-D `…experts.gate_up_proj` [E, 2I, H] / `…experts.down_proj`
    [E, H, I] from the per-expert `…experts.{e}.gate_proj|up_proj|down_proj` modules.
    """
    shape = tuple(int(s) for s in shape)
    base, _, leaf = name.rpartition(".")
    if len(shape) == 3 and leaf in EXPERT_PARTS and base.endswith("experts"):
        E, rows, n = shape
        parts_names = EXPERT_PARTS[leaf]
        part_rows = rows // len(parts_names)
        kinds = {}
        for e in range(E):
            for p in parts_names:
                kinds[(e, p)] = _stored_kind(ckpt, f"{base}.{e}.{p}")
        if not any(kinds.values()):
            return None
        missing = [f"{base}.{e}.{p}" for (e, p), k in kinds.items() if k is None]
        if missing:
            raise MinidiffError(f"{ckpt.folder}: {name} is stored per expert, but {missing[0]} has no quantized "
                                f"weight" + (f" (and {len(missing) - 1} more are missing)" if len(missing) > 1 else ""))
        parts = [[_load_2d(ckpt, f"{base}.{e}.{p}", (part_rows, n), quantization_config, kinds[(e, p)])
                  for p in parts_names] for e in range(E)]
        return QuantExperts(name, parts, shape)
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    kind = _stored_kind(ckpt, module)
    if kind is None:
        return None
    return _load_2d(ckpt, module, shape, quantization_config, kind)

