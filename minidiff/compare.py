"""`minidiff compare A B`: where two traces part ways.

A is a reference trace (`minidiff trace`, schema in docs/trace.md); B is another trace, or another
runtime's dump of the same run (any safetensors file), with `--map` naming its tensors in A's terms.
For every tensor of A that B also has, in A's computation order:

    max |Δ|, max |Δ| / max|A|, and pass/fail against  tol = rtol · max(1, max|A|)  (+ atol)
    ids (router choices, commits): the fraction of rows that agree (router ids as sets: order is free)
    logits: top-1 agreement, top-5 overlap, KL(softmax A ‖ softmax B) mean and max

and the first tensor past tolerance, which names the op and layer where B went wrong. Once an input
id tensor differs (e.g. `commit.ids` after an argmax flipped), what follows was computed on different
inputs: the report says so instead of blaming those layers.
"""

from __future__ import annotations

import fnmatch
import json
import re
import stat
import sys
from pathlib import Path

import numpy as np

from .errors import MinidiffError
from .output import check_output_file, write_atomic
from .tensors import bf16_to_f32

INPUTS = re.compile(r"(^|\.)(prompt_ids|canvas_ids|ids)$")   # tensors that are inputs of what follows


def read_trace(path, what: str) -> tuple[dict, list]:
    """-> ({name: float32/int64 array}, names in computation order). Reads untrusted files strictly."""
    from .weights import SafetensorsFile
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise MinidiffError(f"{what} {p}: cannot read ({e.strerror})")
    if not stat.S_ISREG(st.st_mode):
        raise MinidiffError(f"{what} {p}: not a regular file")
    f = SafetensorsFile(p)
    tensors = {}
    for name, (dtype, shape, _) in f.entries.items():
        raw = f.raw(name)
        if dtype == "BF16":
            tensors[name] = bf16_to_f32(raw)
        elif dtype.startswith("F") and not dtype.startswith("F8"):
            tensors[name] = raw.astype(np.float32, copy=False)
        elif dtype.startswith(("I", "U")) or dtype == "BOOL":
            tensors[name] = raw.astype(np.int64)
        else:
            raise MinidiffError(f"{what} {p}: tensor {name!r} has dtype {dtype}, which compare does not read")
    order = []
    try:                                    # (deeply nested JSON is a RecursionError: no order, not a crash)
        listed = json.loads(f.metadata.get("order", "[]"))
        order = [n for n in listed if isinstance(n, str) and n in tensors] if isinstance(listed, list) else []
    except (ValueError, RecursionError):
        pass
    order += sorted(set(tensors) - set(order), key=_natural)
    return tensors, order


def schema_version(path) -> str | None:
    """The trace schema version a `minidiff trace` file states (None for another runtime's dump)."""
    from .weights import SafetensorsFile
    meta = SafetensorsFile(Path(path)).metadata
    return str(meta.get("schema_version")) if meta.get("schema") == "minidiff-trace" else None


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_map(path) -> list[tuple[re.Pattern, str]]:
    """A name map: JSON {"B's name": "A's name"}, `{i}` standing for a layer number on both sides."""
    from .folder import parse_json
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise MinidiffError(f"--map {path}: cannot read ({getattr(e, 'strerror', None) or e})")
    d = parse_json(text, f"--map {path}")
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise MinidiffError(f"--map {path}: must be a JSON object of name -> name")
    if len(d) > 100_000 or any(len(k) > 1000 or len(v) > 1000 for k, v in d.items()):
        raise MinidiffError(f"--map {path}: at most 100,000 names of at most 1,000 characters")
    rules = []
    for b, a in d.items():
        if "{i}" in a and "{i}" not in b:
            raise MinidiffError(f"--map {path}: {a!r} uses {{i}} but {b!r} has no {{i}} to take it from")
        first, *rest = re.escape(b).split(re.escape("{i}"))      # a second {i} must be the same number
        pattern = first + "".join(("(?P<i>\\d+)" if j == 0 else "(?P=i)") + part for j, part in enumerate(rest))
        rules.append((re.compile(pattern + "$"), a))
    return rules


def rename(tensors: dict, rules) -> dict:
    """B's tensors under A's names (unmatched names are kept as they are)."""
    out = {}
    for name, a in tensors.items():
        for pattern, target in rules:
            m = pattern.match(name)
            if m:
                name = target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
                break
        out[name] = a
    return out


def _softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def compare_tensor(name: str, a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> dict:
    """One row of the report."""
    row = {"name": name, "shape": list(a.shape)}
    if a.shape != b.shape:
        return {**row, "ok": False, "note": f"shape {list(b.shape)} != {list(a.shape)}"}
    if np.issubdtype(a.dtype, np.integer):
        if name.endswith("router_ids"):    # top-k as sets: the order of equal-ranked experts is free
            same = (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)
        elif a.size == 0:                   # no rows: nothing to disagree on
            same = np.ones(0, dtype=bool)
        else:
            same = (a == b).reshape(a.shape[0], -1).all(axis=-1) if a.ndim > 1 else a == b
        agree = float(same.mean()) if same.size else 1.0
        return {**row, "ok": agree == 1.0, "agree": agree}
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {**row, "ok": False, "note": "non-finite values"}
    scale = float(np.abs(a).max()) if a.size else 0.0
    err = float(np.abs(a - b).max()) if a.size else 0.0
    tol = rtol * max(1.0, scale) + atol
    row.update(ok=err <= tol, max_abs=err, max_rel=err / scale if scale else err, tol=tol)
    if name.endswith("logits") and a.ndim == 2 and a.size:
        top_a, top_b = a.argmax(-1), b.argmax(-1)
        k = min(5, a.shape[-1])
        ka, kb = np.argsort(-a, axis=-1)[:, :k], np.argsort(-b, axis=-1)[:, :k]
        overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(ka, kb)])
        pa, pb = _softmax(a), _softmax(b)
        kl = (pa * (np.log(np.maximum(pa, 1e-300)) - np.log(np.maximum(pb, 1e-300)))).sum(-1)
        row.update(top1=float((top_a == top_b).mean()), top5=float(overlap),
                   kl_mean=float(kl.mean()), kl_max=float(kl.max()))
    return row


def compare(a: dict, order: list, b: dict, rtol: float = 1e-4, atol: float = 0.0) -> dict:
    """Compare B to the reference A, tensor by tensor in A's order -> a report dict."""
    rows, missing, first_bad, diverged = [], [], None, None
    for name in order:
        if name not in b:
            missing.append(name)
            continue
        row = compare_tensor(name, a[name], b[name], rtol, atol)
        if diverged is not None:
            row["after_divergent_input"] = diverged
        rows.append(row)
        if not row["ok"]:
            if INPUTS.search(name) and diverged is None:
                diverged = name                 # later tensors saw other inputs
            elif first_bad is None and diverged is None:
                first_bad = name
    return {"rows": rows, "missing_in_b": missing, "extra_in_b": sorted(set(b) - set(order), key=_natural),
            "first_past_tolerance": first_bad, "divergent_input": diverged, "rtol": rtol, "atol": atol,
            "computed": sum(not INPUTS.search(r["name"]) for r in rows),
            "ok": all(r["ok"] for r in rows) and any(not INPUTS.search(r["name"]) for r in rows)}


def format_report(rep: dict, all_rows: bool = False) -> str:
    """The report as a table: every failing row, and (all_rows) the passing ones too."""
    lines = [f"{'tensor':<44} {'shape':<16} {'max|Δ|':>10} {'rel':>9} {'tol':>9}  result"]
    for r in rep["rows"]:
        if r["ok"] and not all_rows:
            continue
        shape = "×".join(map(str, r["shape"])) or "scalar"
        if "agree" in r:
            nums = f"{'':>10} {'':>9} {'':>9}  {'ok' if r['ok'] else 'DIFFERS'} ({r['agree']:.1%} rows agree)"
        elif "max_abs" in r:
            nums = f"{r['max_abs']:>10.3g} {r['max_rel']:>9.2g} {r['tol']:>9.2g}  {'ok' if r['ok'] else 'PAST TOL'}"
            if "top1" in r:
                nums += f"  top1 {r['top1']:.1%} top5 {r['top5']:.1%} KL {r['kl_mean']:.2g}/{r['kl_max']:.2g}"
        else:
            nums = f"{'':>10} {'':>9} {'':>9}  {r['note']}"
        if "after_divergent_input" in r:
            nums += "  (inputs differ)"
        lines.append(f"{r['name'][:44]:<44} {shape[:16]:<16} {nums}")
    n_ok = sum(r["ok"] for r in rep["rows"])
    lines.append(f"{n_ok}/{len(rep['rows'])} tensors within tolerance (rtol {rep['rtol']:g}, atol {rep['atol']:g})"
                 + (f"; {len(rep['missing_in_b'])} of A's tensors not in B" if rep["missing_in_b"] else ""))
    if rep["first_past_tolerance"]:
        lines.append(f"first past tolerance: {rep['first_past_tolerance']}")
    if rep["divergent_input"]:
        lines.append(f"inputs differ from {rep['divergent_input']} on: later tensors compare different inputs")
    if not rep["rows"]:
        lines.append("no tensor in common (a --map file names B's tensors in A's terms)")
    elif not rep["computed"]:
        lines.append("only inputs (ids) in common: nothing computed was compared (a --map file names B's tensors)")
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("a", metavar="A", help="reference trace (.safetensors from `minidiff trace`)")
    p.add_argument("b", metavar="B", help="trace or dump to check against A")
    p.add_argument("--map", default=None, metavar="F.json",
                   help='JSON object renaming B\'s tensors to A\'s names, e.g. {"h.{i}.attn": "encoder.layers.{i}.attention"}')
    p.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max(1, max|A|) (default 1e-4)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance added to it (default 0)")
    p.add_argument("--only", default=None, metavar="GLOB",
                   help="compare only the tensors whose names match, e.g. '*logits' or 'denoiser.layers.*'")
    p.add_argument("--all", action="store_true", help="list passing tensors too")
    p.add_argument("--json", default=None, metavar="F", help="also write the report as JSON")


def run(args) -> int:
    for name in ("rtol", "atol"):
        v = getattr(args, name)
        if not (np.isfinite(v) and v >= 0):
            raise MinidiffError(f"--{name} must be a number >= 0, got {v}")
    out = None
    if args.json:                                    # checked before any work: never one of the inputs
        out = check_output_file(Path(args.json), "--json")
        if any(out.resolve() == Path(f).resolve() for f in (args.a, args.b) + ((args.map,) if args.map else ())):
            raise MinidiffError(f"--json {args.json}: is one of this command's inputs; choose another file")
    a, order = read_trace(args.a, "A")
    b, _ = read_trace(args.b, "B")
    va, vb = schema_version(args.a), schema_version(args.b)
    if va is not None and vb is not None and va != vb:
        raise MinidiffError(f"A is a trace of schema {va}, B of schema {vb}: their names do not mean the same "
                            "tensors; trace both with the same minidiff")
    if args.map:
        b = rename(b, load_map(args.map))
    if args.only:
        order = [n for n in order if fnmatch.fnmatchcase(n, args.only)]
        if not order:
            raise MinidiffError(f"--only {args.only!r}: no tensor of A matches")
    rep = compare(a, order, b, args.rtol, args.atol)
    print(format_report(rep, args.all))
    if args.json:
        write_atomic(out, (json.dumps(rep, indent=1) + "\n").encode())
    sys.stdout.flush()
    return 0 if rep["ok"] else 1
