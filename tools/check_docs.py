"""Run every example in README.md and docs/*.md and check its output (CI runs this).

Two kinds of examples are run; every other code block is prose:

    ```console                 each `$ ` line is a command (a trailing `\\` continues it), run by bash in
    $ minidiff …               the repository root with this Python's `bin/` first on PATH; the lines up
    expected stdout            to the next `$ ` are its expected standard output (stderr is not compared)
    ```

    >>> python                 `>>>` / `...` lines anywhere in a file (in ```python or ```pycon blocks),
    expected                   run as one doctest per file in the repository root (ELLIPSIS and
                               NORMALIZE_WHITESPACE on: `...` in expected output matches anything)

In console output, a line `...` matches any number of lines, and `...` within a line any text. A command that exits non-zero fails unless
it is the last of a block fenced ```console exit=N and exits with N.

    python tools/check_docs.py            # all files
    python tools/check_docs.py docs/tutorial.md -v
"""

from __future__ import annotations

import argparse
import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```console(?:\s+exit=(\d+))?\s*$")


def console_examples(text: str):
    """-> [(line number, command, expected lines, expected exit status)]"""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        i += 1
        if not m:
            continue
        status = int(m.group(1) or 0)
        block = []
        while i < len(lines) and lines[i].strip() != "```":
            block.append((i + 1, lines[i]))
            i += 1
        j = 0
        while j < len(block):
            n, line = block[j]
            if not line.startswith("$ "):
                j += 1
                continue
            cmd = line[2:]
            while cmd.endswith("\\") and j + 1 < len(block):
                j += 1
                cmd = cmd[:-1] + " " + block[j][1].strip()
            j += 1
            expected = []
            while j < len(block) and not block[j][1].startswith("$ "):
                expected.append(block[j][1].rstrip())
                j += 1
            out.append((n, cmd, expected, status if j >= len(block) else 0))
    return out


def matches(expected: list[str], got: list[str]) -> bool:
    """Line by line; an expected line `...` matches any number of lines, and `...` inside a line matches
    any text (numbers that vary with the machine, say)."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(matches(expected[1:], got[k:]) for k in range(len(got) + 1))
    line = re.escape(expected[0]).replace(re.escape("..."), ".*")
    return bool(got) and re.fullmatch(line, got[0]) is not None and matches(expected[1:], got[1:])


def run_console(path: Path, verbose: bool) -> list[str]:
    failures = []
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="100", NO_COLOR="1")
    for n, cmd, expected, status in console_examples(path.read_text(encoding="utf-8")):
        p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        got = [line.rstrip() for line in p.stdout.splitlines()]
        while expected and expected[-1] == "":
            expected = expected[:-1]
        ok = p.returncode == status and matches(expected, got)
        if verbose or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {path.relative_to(ROOT)}:{n}: $ {cmd}")
        if not ok:
            failures.append(f"{path.relative_to(ROOT)}:{n}")
            print(f"     exit {p.returncode} (expected {status})\n     expected:\n" +
                  "\n".join(f"       {line}" for line in expected) + "\n     got:\n" +
                  "\n".join(f"       {line}" for line in got) +
                  (f"\n     stderr:\n       {p.stderr.strip()[-800:]}" if p.stderr.strip() else ""))
    return failures


def run_doctests(path: Path, verbose: bool) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if ">>> " not in text:
        return []
    test = doctest.DocTestParser().get_doctest(text, {"__name__": "docs"}, str(path.relative_to(ROOT)),
                                               str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = runner.run(test, out=sys.stdout.write)
    finally:
        os.chdir(cwd)
    if verbose or result.failed:
        print(f"{'ok  ' if not result.failed else 'FAIL'} {path.relative_to(ROOT)}: "
              f"{result.attempted - result.failed}/{result.attempted} doctest examples")
    return [f"{path.relative_to(ROOT)} (doctest)"] if result.failed else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="default: README.md and docs/*.md")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    files = [Path(f).resolve() for f in args.files] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    failures, n_console, n_doc = [], 0, 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        n_console += len(console_examples(text))
        n_doc += len(doctest.DocTestParser().get_examples(text))
        failures += run_console(f, args.verbose) + run_doctests(f, args.verbose)
    print(f"docs examples: {n_console} console commands, {n_doc} doctest lines in {len(files)} files; "
          f"{len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
