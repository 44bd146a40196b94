"""Command line: ``adampx reproduce`` (the paper's claims, checked) and ``adampx demo``.

Also ``python -m adampx ...``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _reproduce_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from adampx.experiments.classification import OPTIMIZERS
    from adampx.experiments.data import DATASETS
    from adampx.experiments.lm import LM_STEPS
    from adampx.experiments.runner import DEFAULT_TASKS, TASKS

    p = commands.add_parser(
        "reproduce",
        help="reproduce the paper's claims: toys, image classification, a language model",
        description="Reproduce the paper's claims. The default quick suite runs the 2-D and 3-D "
        "toys and a small BatchNorm ResNet on scikit-learn's digits (ships with the package) "
        "with SGD/SGDP/Adam/AdamW/AdamP, with and without weight decay, 3 seeds; about two "
        "minutes on a 2-core CPU. --tasks lm trains a small transformer language model on the "
        "standard library's pydoc_data text with AdamW and AdamP. The runs go in parallel "
        "worker processes, one thread each. Writes results.json, report.md and figures into "
        "--out.",
    )
    p.add_argument("--suite", default="quick", help="quick (default) or full (more seeds, epochs)")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        metavar="TASK",
        help=f"any of {' '.join(TASKS)} (default: {' '.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        metavar="NAME",
        help=f"subset of {' '.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="seeds of the classification and lm runs (default: 0 1 2, lm 0..4; full suite: "
        "0..4, lm 0..9)",
    )
    p.add_argument("--epochs", type=int, help="epochs per classification run")
    p.add_argument(
        "--lm-steps",
        type=int,
        help=f"steps per language-model run (default {LM_STEPS['quick']}; full suite "
        f"{LM_STEPS['full']})",
    )
    p.add_argument("--dataset", default="digits", help=f"one of {' '.join(DATASETS)}")
    p.add_argument("--data-dir", help="where the dataset lies (cifar10, cifar100, imagefolder)")
    p.add_argument("--model", help="small_resnet or resnet18 (default: by dataset)")
    p.add_argument("--batch-size", type=int, help="batch size per process (default: by dataset)")
    p.add_argument("--image-size", type=int, help="imagefolder: crop size (default 224)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", default="reproduce-results", help="output folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in --out, run the rest (failed ones again)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over in an --out with results")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at a time, each in its own worker process with one thread (default: the "
        "CPUs this process may use, one on a GPU; 1 runs them in this process)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--parallel",
        default="ddp",
        help="under torchrun: ddp (default) or fsdp2 (sharded params and state)",
    )


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from adampx.experiments.classification import OPTIMIZERS
    from adampx.experiments.demo import DEFAULT_OPTIMIZERS

    demo = commands.add_parser(
        "demo",
        help="one seed of the reproduction's digits runs with AdamW/AdamP/SGD/SGDP (quick)",
        description="Train the reproduction's small BatchNorm ResNet on scikit-learn's digits "
        "once per optimizer (weight decay on, one seed) and print the test accuracy and the "
        "norm of the scale-invariant weights at the start and the end.",
    )
    demo.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the model's init and data order (default 0)"
    )
    demo.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help=f"any of {' '.join(OPTIMIZERS)} (default: {' '.join(DEFAULT_OPTIMIZERS)})",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="adampx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _reproduce_parser(commands)
    _demo_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        from adampx.experiments.demo import run

        run(epochs=args.epochs, seed=args.seed, optimizers=args.optimizers)
        return 0
    from adampx.experiments.data import DataError
    from adampx.experiments.runner import Settings, SettingsError, reproduce

    settings = Settings(
        suite=args.suite,
        tasks=args.tasks,
        optimizers=args.optimizers,
        seeds=args.seeds,
        epochs=args.epochs,
        lm_steps=args.lm_steps,
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        workers=args.workers,
        parallel=args.parallel,
        jobs=args.jobs,
    )
    try:
        results = reproduce(settings)
    except (SettingsError, DataError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike
            print(f"adampx reproduce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    failed = results.get("failed", [])
    if failed:
        names = ", ".join(f["run_id"] for f in failed)
        print(
            f"adampx reproduce: {len(failed)} run(s) failed ({names}); their errors are in "
            f"{os.path.join(args.out, 'results.json')} and the report; rerun with --resume "
            "to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
