"""The ``fastperc`` command (also ``python -m fastperc``).

    fastperc train     --style IMAGE --dataset DIR --out RUN_DIR [...]   train a style network
    fastperc stylize   --model MODEL INPUT... --out OUT [...]             apply one
    fastperc optimize  --content IMAGE --style IMAGE --out OUT [...]      the Gatys et al. baseline
    fastperc objective --content IMAGE --style IMAGE IMAGE [...]          equation 5 of any image
    fastperc upscale   --model MODEL INPUT... --out OUT [--match-histogram]  super-resolution
    fastperc sr-eval   --model MODEL|bicubic --hr-dir DIR --scale 4|8      mean PSNR/SSIM (Y channel)
    fastperc sr-train  --scale 4|8 --dataset DIR --out RUN_DIR [--loss perceptual|pixel]  train one
    fastperc bench     [--quick] [--device cpu|cuda] [--out JSON]          the benchmarks (fastperc.bench)

Bad input (a missing or unreadable file, an empty dataset, a model or weights file that does
not fit, an output that cannot be written) ends with one line on stderr naming the problem and
the path, and exit code 2.

Each command module registers its own subcommands and options (``register(subparsers)``);
``bench``'s are those of :mod:`fastperc.bench.runner`.
"""
from __future__ import annotations

import argparse
import sys

from fastperc import __version__
from fastperc.commands import optimize, sr_train, stylize, train, upscale
from fastperc.commands.errors import InputError

COMMAND_MODULES = (train, stylize, optimize, upscale, sr_train)  # each registers its commands, in this order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastperc", description="Perceptual-loss style transfer (Johnson et al. 2016) with fused kernels.")
    parser.add_argument("--version", action="version", version=f"fastperc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)

    from fastperc.bench import runner as bench

    r = sub.add_parser("bench", help="time the fused ops and networks against eager torch and torch.compile",
                       description="Run every benchmark comparison, print one table and, with --out, "
                                   "write the results JSON.")
    bench.add_arguments(r)
    r.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastperc`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed, status 2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except InputError as exc:
        print(f"fastperc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastperc {args.command}: interrupted", file=sys.stderr)
        return 130
