"""`minidiff` command line: one subcommand per module.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Problems with the user's input surface as `MinidiffError` and are printed as one line (exit 2);
Ctrl-C exits 130.
"""

import argparse
import errno
import importlib
import os
import signal
import sys
import warnings

from .errors import MinidiffError

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("minidiff.cli_generate", "generate text from a prompt (live denoising view on a terminal)"),
    "chat": ("minidiff.cli_generate", "multi-turn chat in the terminal"),
    "trace": ("minidiff.trace", "write every intermediate tensor of one input (encoder, denoiser, commit, KV cache)"),
    "compare": ("minidiff.compare", "compare two traces (or a trace and another runtime's dump), layer by layer"),
    "train": ("minidiff.train.trainer", "train or fine-tune on (prompt, answer) pairs with minidiff's own gradients"),
    "sudoku": ("minidiff.cli_sudoku", "solve Sudoku puzzles with a Sudoku-trained model (live grid on a terminal)"),
    "quantize": ("minidiff.quantize", "convert a bf16/fp32 checkpoint to an int4 (W4A16) checkpoint"),
}


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated token ids, e.g. "2,17,300"."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format and exit status 2."""

    def error(self, message):
        self.exit(2, f"minidiff: error: {message}\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the selected subcommand's module is imported (fast start, isolated failures)."""
    from . import __version__
    parser = _Parser(prog="minidiff", description="DiffusionGemma block-diffusion LM in NumPy/CuPy")
    parser.add_argument("--version", action="version", version=f"minidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", None))(p)
            p.set_defaults(_run=getattr(mod, f"run_{name}", getattr(mod, "run", None)))
    return parser


def _on_signal(signum, frame):
    """SIGTERM / SIGHUP end minidiff like Ctrl-C: cleanup code (temporary files) runs on the way out."""
    raise KeyboardInterrupt


def utf8_text(text: str, what: str) -> str:
    """`text` as read from argv or stdin, which Python decodes with lone surrogates for invalid UTF-8
    bytes: those are an error here, not a crash in the tokenizer later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MinidiffError(f"{what} is not valid UTF-8 (at character {e.start})")
    return text


def _quiet_stdout():
    """After stdout failed (disk full, closed pipe), point it at /dev/null so that Python's own flush at
    exit does not print a second error."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


class _ClosedStream:
    """Stands in for a standard stream the shell closed (`>&-`): writing to it is an error line."""

    def write(self, text):
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self):
        pass

    def isatty(self):
        return False


def main(argv=None) -> int:
    if sys.stdout is None:
        sys.stdout = _ClosedStream()
    # floating-point warnings would be stray stderr lines: non-finite results are checked where they matter
    warnings.simplefilter("ignore", RuntimeWarning)
    try:
        for sig in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, sig):
                signal.signal(getattr(signal, sig), _on_signal)
        argv = sys.argv[1:] if argv is None else list(argv)
        for i, a in enumerate(argv):
            utf8_text(a, f"argument {i + 1}")
        selected = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(selected if selected in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        code = int(args._run(args) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()                   # a full disk shows here, as one line below
        return code
    except MinidiffError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\nminidiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except UnicodeError as e:                    # text on stdin or in a file that is not UTF-8
        return _fail(f"input is not valid UTF-8 text ({type(e).__name__} at position {getattr(e, 'start', '?')})")
    except MemoryError:
        return _fail("out of memory")
    except OSError as e:                         # disk full, permission denied, a path that is a folder, …
        _quiet_stdout()
        name = e.filename if e.filename is not None else ("standard output" if e.errno in (errno.ENOSPC, errno.EFBIG) else "")
        return _fail(f"{name}: {e.strerror or e}" if name else f"{e.strerror or e}")


def _fail(message: str) -> int:
    message = message.replace("\n", " ").replace("\r", " ")
    try:
        print(f"minidiff: error: {message}", file=sys.stderr)
    except (OSError, ValueError, AttributeError):
        pass
    return 2


if __name__ == "__main__":
    sys.exit(main())
