"""`minidiff` command line: one subcommand per module.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Problems with the user's input surface as `MinidiffError` and are printed as one line (exit 2);
Ctrl-C exits 130.
"""

import argparse
import importlib
import sys

from .errors import MinidiffError

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("minidiff.cli_generate", "generate text from a prompt (live denoising view on a terminal)"),
    "chat": ("minidiff.cli_generate", "multi-turn chat in the terminal"),
    "trace": ("minidiff.trace", "write the oracle tensors (encoder hidden states, denoiser logits) of one input"),
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
    parser = _Parser(prog="minidiff", description="DiffusionGemma block-diffusion LM in NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", None))(p)
            p.set_defaults(_run=getattr(mod, f"run_{name}", getattr(mod, "run", None)))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminidiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
