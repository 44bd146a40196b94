"""Command line: ``python -m adampx demo`` (also the ``adampx`` console script)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adampx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small CNN on the digits data set with AdamW/AdamP/SGD/SGDP"
    )
    demo.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help="subset of AdamW AdamP SGD SGDP (default: all four)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        from adampx.demo import run

        run(epochs=args.epochs, seed=args.seed, optimizers=args.optimizers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
