"""A model folder is untrusted input: every file minidiff reads from one comes through this module.

People load folders that strangers uploaded, so a folder is read as an attacker may have written it:

    paths      a name from the folder (an index's shard names, `weight_map` values) must be a plain
               relative name; once symlinks are resolved it must still lie inside the folder, or inside
               the Hugging Face cache's `blobs/` of the same repository (hub snapshots are links there).
               Nothing else is opened: not `../x`, not `/etc/passwd`, not a link to a private key.
    files      regular files only: a named pipe would block the reader forever, a device could be endless.
    sizes      each kind of file has a size limit, checked before it is read.
    JSON       duplicate keys, NaN/Infinity, numbers that overflow a float, integers of more than 30 digits
               and runaway nesting are refused; invalid UTF-8 is an error, not a traceback.

Every problem is a `MinidiffError` whose one line names the file (and the field, where there is one) and
never echoes the file's bytes. The checks of what the JSON *means* (types, ranges, agreement with the
tensors) live with the code that reads each file: config.py, weights.py, schemes.py, generation_config.py, chat.py.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import MinidiffError

MiB = 2 ** 20
MAX_JSON_BYTES = {               # a file's size limit, checked before reading
    "config.json": 16 * MiB,
    "generation_config.json": 1 * MiB,
    "model.safetensors.index.json": 64 * MiB,
    "tokenizer_config.json": 64 * MiB,
    "hf_quant_config.json": 1 * MiB,
}
MAX_TEXT_BYTES = 8 * MiB         # chat_template.jinja
MAX_TOKENIZER_BYTES = 1024 * MiB  # tokenizer.json (the release's is 33 MB)
MAX_INT_DIGITS = 30


def plain_name(name, where: str) -> str:
    """A file name taken from inside a folder's own files: relative, no '..', no absolute path, no NUL."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        raise MinidiffError(f"{where}: file name {_show(name)} is not a valid file name")
    p = Path(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0] or "\\" in name:
        raise MinidiffError(f"{where}: file name {_show(name)} points outside the model folder")
    return name


def _show(v, n: int = 60) -> str:
    """A value from an untrusted file, shortened and with control characters escaped, for an error line."""
    s = repr(v)
    return s if len(s) <= n else s[:n] + "…"


class ModelFolder:
    """The files of one model folder, each checked before it is opened."""

    def __init__(self, folder):
        folder = Path(folder)
        try:
            self.root = folder.resolve(strict=True)
        except FileNotFoundError:
            raise MinidiffError(f"{folder}: no such folder")
        except (OSError, RuntimeError) as e:
            raise MinidiffError(f"{folder}: cannot open ({getattr(e, 'strerror', None) or type(e).__name__})")
        if not self.root.is_dir():
            raise MinidiffError(f"{folder}: not a folder")
        self.shown = folder            # how errors name it (as the user wrote it)
        self.inside = [self.root]
        # a hub cache snapshot (…/models--org--name/snapshots/<revision>/) links its files into …/blobs/
        if self.root.parent.name == "snapshots" and self.root.parent.parent.name.startswith("models--"):
            blobs = self.root.parent.parent / "blobs"
            if blobs.is_dir():
                self.inside.append(blobs.resolve())

    def path(self, name: str, where: str | None = None) -> Path | None:
        """The resolved path of the regular file `name` in the folder; None when there is no such file.

        `where` names the file that mentioned `name` (an index), for the error line.
        """
        where = where or str(self.shown)
        plain_name(name, where)
        p = self.root / name
        if not os.path.lexists(p):
            return None
        real = Path(os.path.realpath(p))
        if not any(real == d or d in real.parents for d in self.inside):
            raise MinidiffError(f"{self.shown / name}: links to a file outside the model folder")
        try:
            st = os.stat(real)
        except OSError as e:
            raise MinidiffError(f"{self.shown / name}: cannot read ({e.strerror})")
        if not stat.S_ISREG(st.st_mode):
            raise MinidiffError(f"{self.shown / name}: not a regular file")
        return real

    def has(self, name: str) -> bool:
        return self.path(name) is not None

    def names(self, suffix: str = "") -> list[str]:
        """Names of the entries directly in the folder ending in `suffix`, sorted."""
        try:
            return sorted(e.name for e in os.scandir(self.root) if e.name.endswith(suffix))
        except OSError as e:
            raise MinidiffError(f"{self.shown}: cannot list ({e.strerror})")

    def read_bytes(self, name: str, limit: int) -> bytes:
        p = self.path(name)
        if p is None:
            raise MinidiffError(f"{self.shown / name}: no such file")
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise MinidiffError(f"{self.shown / name}: larger than the {limit // MiB} MiB allowed for it")
                data = f.read(size + 1)            # (+1: a file that grew since is caught below)
        except OSError as e:
            raise MinidiffError(f"{self.shown / name}: cannot read ({e.strerror})")
        if len(data) > limit:
            raise MinidiffError(f"{self.shown / name}: larger than the {limit // MiB} MiB allowed for it")
        return data

    def read_text(self, name: str, limit: int = MAX_TEXT_BYTES) -> str:
        try:
            return self.read_bytes(name, limit).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MinidiffError(f"{self.shown / name}: not valid UTF-8 (byte {e.start})")

    def read_json(self, name: str):
        """A JSON file of the folder, parsed strictly (see the module docstring)."""
        return parse_json(self.read_text(name, MAX_JSON_BYTES.get(name, 16 * MiB)), str(self.shown / name))


def parse_json(text: str, where: str):
    """json.loads, strictly: no duplicate keys, no NaN/Infinity, finite floats, integers of at most 30
    digits; nesting deep enough to exhaust the parser's recursion is an error too. Errors name `where`."""
    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                raise MinidiffError(f"{where}: key {_show(k)} appears twice in one object")
            d[k] = v
        return d

    def constant(name):
        raise MinidiffError(f"{where}: {name} is not a JSON number")

    def number(s):
        v = float(s)
        if not math.isfinite(v):
            raise MinidiffError(f"{where}: number {_show(s)} is out of range")
        return v

    def integer(s):
        if len(s.lstrip("-")) > MAX_INT_DIGITS:
            raise MinidiffError(f"{where}: integer of {len(s)} digits is out of range")
        return int(s)

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=number,
                          parse_int=integer)
    except json.JSONDecodeError as e:
        raise MinidiffError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except RecursionError:
        raise MinidiffError(f"{where}: nested too deeply")
