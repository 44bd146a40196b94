"""The reproduction suite: plan the runs, run what is missing, keep every finished run.

``adampx reproduce`` calls :func:`reproduce`. The suite is a list of runs, each with a stable
``run_id``; every finished run is appended to ``OUT/results.json`` at once (written to a
temporary file and renamed, so an interruption never leaves a broken file), with its curves
in ``OUT/curves/``. Ctrl-C keeps the finished runs; ``--resume`` skips them. Then the report
(``report.md``, figures, a summary on the terminal) is made from ``results.json``.

``results.json`` schema (version 1)::

    {"schema": 1,
     "settings": {...the settings that shape the numbers...},
     "runs": [{"run_id": str, "task": "toy2d" | "toy3d" | "classification",
               "dataset": str, "model": str, "optimizer": str, "weight_decay": float,
               "seed": int, "test_accuracy": float | null, "norm_start": float,
               "norm_end": float, "lr": float | null, "epochs": int | null,
               "steps": int, "seconds": float, "train_loss": float | null,
               "final_error": float | null, "curve": str}]}

``norm_*`` is the norm of the scale-invariant weights (toys: ``‖w‖``); ``final_error`` is the
toys' final angle to the optimum in degrees (2-D) or Rosenbrock value (3-D); ``curve`` is the
path of the run's curve file, relative to ``OUT`` (toys: ``norms``, ``errors``, ``path`` per
step; classification: ``curve``, ``layers``, ``views``, see
``adampx.experiments.classification.RunResult``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adampx.experiments import toys
from adampx.experiments.classification import OPTIMIZERS, scale_invariant_names, train_classifier
from adampx.experiments.data import DATASETS, DataSplits, load_dataset
from adampx.experiments.models import MODELS, build_model

__all__ = ["RunSpec", "Settings", "SettingsError", "plan", "reproduce"]

SCHEMA = 1
TASKS = ("toy2d", "toy3d", "classification")

# Per dataset: (model, batch size, epochs of the quick suite, epochs of the full suite).
DATASET_DEFAULTS: dict[str, tuple[str, int, int, int]] = {
    "digits": ("small_resnet", 64, 20, 40),
    "cifar10": ("resnet18", 128, 30, 200),
    "cifar100": ("resnet18", 128, 30, 200),
    "imagefolder": ("resnet18", 256, 10, 90),
}
SUITE_SEEDS = {"quick": 3, "full": 5}


class SettingsError(ValueError):
    """Bad command-line settings (unknown names, an output folder in the way, ...)."""


@dataclass
class Settings:
    """Everything that decides what the suite runs (the CLI's options)."""

    suite: str = "quick"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    seeds: list[int] | None = None
    epochs: int | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    batch_size: int | None = None
    image_size: int | None = None
    device: str = "auto"
    out: str = "reproduce-results"
    resume: bool = False
    overwrite: bool = False
    workers: int = 0
    parallel: str = "ddp"

    def resolved(self) -> Settings:
        """Fill the suite's defaults and check every name; raise :class:`SettingsError`."""
        if self.suite not in SUITE_SEEDS:
            raise SettingsError(f"unknown suite {self.suite!r}; choose from {list(SUITE_SEEDS)}")
        _check_names("task", self.tasks, TASKS)
        _check_names("optimizer", self.optimizers, tuple(OPTIMIZERS))
        _check_names("dataset", [self.dataset], DATASETS)
        _check_names("parallel mode", [self.parallel], ("ddp", "fsdp2"))
        model, batch, quick_epochs, full_epochs = DATASET_DEFAULTS[self.dataset]
        s = Settings(**asdict(self))
        s.model = self.model or model
        _check_names("model", [s.model], MODELS)
        s.batch_size = self.batch_size if self.batch_size is not None else batch
        if self.epochs is not None:
            s.epochs = self.epochs
        else:
            s.epochs = quick_epochs if self.suite == "quick" else full_epochs
        s.seeds = self.seeds if self.seeds is not None else list(range(SUITE_SEEDS[self.suite]))
        if not s.seeds:
            raise SettingsError("--seeds needs at least one seed")
        if s.epochs < 1 or s.batch_size < 1:
            raise SettingsError("--epochs and --batch-size must be at least 1")
        return s

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the numbers (a resumed run must match them).

        ``world_size`` is the number of torchrun processes: each trains on its share of every
        batch-size-per-process epoch, so 1 and 2 processes give different numbers.
        """
        keys = ("dataset", "model", "epochs", "batch_size", "image_size")
        fingerprint: dict[str, Any] = {k: getattr(self, k) for k in keys}
        fingerprint["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        return fingerprint


def _check_names(kind: str, names: list[str], valid: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SettingsError(f"unknown {kind}(s) {unknown}; valid names: {', '.join(valid)}")


@dataclass(frozen=True)
class RunSpec:
    """One run of the suite."""

    run_id: str
    task: str
    method: str
    lr: float | None = None
    seed: int = 0
    weight_decay_on: bool = True


def plan(s: Settings) -> list[RunSpec]:
    """The runs of the suite, in the order they run (cheap toys first)."""
    runs: list[RunSpec] = []
    if "toy2d" in s.tasks:
        runs += [RunSpec(f"toy2d/{m}", "toy2d", m, toys.TOY2D_LR) for m in toys.TOY2D_METHODS]
    if "toy3d" in s.tasks:
        runs += [
            RunSpec(f"toy3d/{m}/lr={lr:g}", "toy3d", m, lr)
            for m in toys.TOY3D_METHODS
            for lr in toys.TOY3D_LRS
        ]
    if "classification" in s.tasks:
        assert s.seeds is not None
        for wd_on in (True, False):
            for opt in s.optimizers:
                if not wd_on and opt == "AdamW" and "Adam" in s.optimizers:
                    continue  # without weight decay AdamW is Adam
                for seed in s.seeds:
                    wd = "on" if wd_on else "off"
                    run_id = f"classification/{s.dataset}/{s.model}/{opt}/wd={wd}/seed={seed}"
                    runs.append(RunSpec(run_id, "classification", opt, None, seed, wd_on))
    return runs


# ---------------------------------------------------------------------------- results file


def _load_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SettingsError(f"cannot read {path}: {e}") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise SettingsError(f"{path} is not a results file of this version (schema {SCHEMA})")
    return results


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _prepare_out(s: Settings) -> dict[str, Any]:
    """Create ``OUT`` or reopen it for ``--resume``; refuse to overwrite results silently."""
    out = Path(s.out)
    results_path = out / "results.json"
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} exists and is not a folder")
    if results_path.exists():
        if s.resume:
            results = _load_results(results_path)
            if results["settings"] != s.fingerprint():
                raise SettingsError(
                    f"{results_path} was made with {results['settings']}, not "
                    f"{s.fingerprint()}: resume with the same settings, or choose another --out"
                )
            return results
        if not s.overwrite:
            n = len(_load_results(results_path)["runs"])
            raise SettingsError(
                f"{out} already holds results ({n} runs) that this would overwrite: add "
                "--resume to continue them, --overwrite to start over, or choose another --out"
            )
    (out / "curves").mkdir(parents=True, exist_ok=True)
    return {"schema": SCHEMA, "settings": s.fingerprint(), "runs": []}


# ---------------------------------------------------------------------------- running


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"unknown device {name!r} (use cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda: no CUDA device is available here")
    return device


def _toy_record(spec: RunSpec, run: toys.ToyRun, seconds: float, curve: str) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "task": spec.task,
        "dataset": "synthetic",
        "model": "2-D toy" if spec.task == "toy2d" else "3-D toy (Rosenbrock on the sphere)",
        "optimizer": spec.method,
        "weight_decay": run.weight_decay,
        "seed": 0,
        "test_accuracy": None,
        "norm_start": run.norms[0],
        "norm_end": run.norms[-1],
        "lr": run.lr,
        "epochs": None,
        "steps": len(run.norms) - 1,
        "seconds": seconds,
        "train_loss": None,
        "final_error": run.errors[-1],
        "curve": curve,
    }


def _curve_path(out: Path, run_id: str) -> Path:
    safe = run_id.replace("/", "__").replace("=", "-").replace(" ", "_").replace("+", "p")
    return out / "curves" / f"{safe}.json"


class _Progress:
    """Progress bars on stderr (tqdm), one for the suite and one for the current run."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.suite = tqdm(total=total, desc="suite", unit="run", disable=not enabled, position=0)
        self.run: Any = None

    def start_run(self, label: str, total: int) -> Callable[[int, int, float], None]:
        self.run = self._tqdm(
            total=total, desc=label[:48], unit="step", leave=False, disable=not self.enabled,
            position=1,
        )  # fmt: skip

        def update(step: int, total: int, loss: float) -> None:
            if self.run.total != total:
                self.run.total = total
            self.run.update(step - self.run.n)
            self.run.set_postfix(loss=f"{loss:.3f}", refresh=False)

        return update

    def end_run(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None
        self.suite.update(1)

    def close(self) -> None:
        self.suite.close()


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _distributed(device: torch.device) -> Iterator[int]:
    """Initialise a process group when launched by torchrun; yields this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    try:
        yield torch.distributed.get_rank()
    finally:
        torch.distributed.destroy_process_group()


def _prepare_out_on_rank0(s: Settings, main: bool) -> dict[str, Any]:
    """Rank 0 prepares ``OUT``; under torchrun every rank then gets its verdict and results.

    So that a refusal (an output folder in the way) stops every rank with the same message,
    and a resumed run skips the same runs on every rank.
    """
    results: dict[str, Any] = {"runs": []}
    error = ""
    if main:
        try:
            results = _prepare_out(s)
        except SettingsError as e:
            error = str(e)
    if _is_distributed():
        shared: list[Any] = [error, results]
        torch.distributed.broadcast_object_list(shared, src=0)
        error, results = shared
    if error:
        raise SettingsError(error)
    return results


def reproduce(settings: Settings) -> dict[str, Any]:
    """Run the suite described by ``settings`` and write its report; returns the results."""
    from adampx.experiments.report import write_report

    s = settings.resolved()
    device = _device(s.device)
    if device.type == "cuda" and int(os.environ.get("LOCAL_RANK", "-1")) >= 0:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # Bad data fails here, before any run or output folder exists.
    data: DataSplits | None = None
    if "classification" in s.tasks:
        data = load_dataset(s.dataset, s.data_dir, seed=0, image_size=s.image_size)
    with _distributed(device) as rank:
        main = rank == 0
        results = _prepare_out_on_rank0(s, main)
        out = Path(s.out)
        done = {r["run_id"] for r in results["runs"]}
        todo = [r for r in plan(s) if r.run_id not in done]
        if main and done:
            print(f"resuming: {len(done)} runs done, {len(todo)} to go", file=sys.stderr)
        invariant: set[str] | None = None
        progress = _Progress(len(todo), enabled=main)
        try:
            for spec in todo:
                if spec.task == "classification" and invariant is None:
                    assert data is not None and s.model is not None
                    probe = build_model(
                        s.model, data.num_classes, data.in_channels, data.image_size
                    ).to(device)
                    invariant = scale_invariant_names(probe, data, device)
                record = _run_one(spec, s, data, invariant, device, out, progress)
                if main:
                    results["runs"].append(record)
                    _write_json(out / "results.json", results)
                progress.end_run()
        except KeyboardInterrupt:
            progress.close()
            if main:
                print(
                    f"\ninterrupted: {len(results['runs'])} finished runs are kept in "
                    f"{out / 'results.json'}; rerun with --resume to continue",
                    file=sys.stderr,
                )
            raise
        progress.close()
        if main:
            write_report(out, results)
    return results


def _run_one(
    spec: RunSpec,
    s: Settings,
    data: DataSplits | None,
    invariant: set[str] | None,
    device: torch.device,
    out: Path,
    progress: _Progress,
) -> dict[str, Any]:
    curve_path = _curve_path(out, spec.run_id)
    curve_rel = str(curve_path.relative_to(out))
    start = time.perf_counter()
    if spec.task in ("toy2d", "toy3d"):
        assert spec.lr is not None
        run = (
            toys.run_toy2d(spec.method)
            if spec.task == "toy2d"
            else toys.run_toy3d(spec.method, lr=spec.lr)
        )
        record = _toy_record(spec, run, time.perf_counter() - start, curve_rel)
        payload: Any = {"norms": run.norms, "errors": run.errors, "path": run.path}
    else:
        assert data is not None and s.model is not None and s.epochs and s.batch_size
        result = train_classifier(
            data,
            model_name=s.model,
            optimizer_name=spec.method,
            weight_decay_on=spec.weight_decay_on,
            seed=spec.seed,
            epochs=s.epochs,
            batch_size=s.batch_size,
            device=device,
            invariant=invariant,
            progress=progress.start_run(spec.run_id.split("/", 3)[-1], 1),
            workers=s.workers,
            parallel=s.parallel,
        )
        record = {
            "run_id": spec.run_id,
            "task": "classification",
            "dataset": s.dataset,
            "model": s.model,
            "optimizer": spec.method,
            "weight_decay": result.weight_decay,
            "seed": spec.seed,
            "test_accuracy": result.test_accuracy,
            "norm_start": result.norm_start,
            "norm_end": result.norm_end,
            "lr": None,
            "epochs": s.epochs,
            "steps": result.steps,
            "seconds": result.seconds,
            "train_loss": result.train_loss,
            "final_error": None,
            "curve": curve_rel,
        }
        payload = {"curve": result.curve, "layers": result.layers, "views": result.views}
    if not _is_distributed() or torch.distributed.get_rank() == 0:
        _write_json(curve_path, payload)
    return record
