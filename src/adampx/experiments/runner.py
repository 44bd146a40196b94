"""The reproduction suite: plan the runs, run what is missing in parallel, keep every run.

``adampx reproduce`` calls :func:`reproduce`. The suite is a list of independent runs, each
with a stable ``run_id``. They run in ``--jobs`` worker processes (default: the CPUs this
process may use, see :func:`adampx.experiments.pool.available_cpus`), each run with one
intra-op thread: the models are small, and torch's threads only wait for each other, badly
so on a busy machine. ``--jobs 1`` runs them one after the other in this process, also with
one thread, so the numbers do not depend on ``--jobs``. Under torchrun the ranks share each
run instead (DDP or FSDP2), one run after the other, with torch's threads as they are.

Every finished run is appended to ``OUT/results.json`` at once (written to a temporary file
and renamed, so an interruption never leaves a broken file), with its curves in
``OUT/curves/``; a run that raises, or whose worker process dies, is recorded in ``failed``
with its error and the others go on. Ctrl-C stops every worker and keeps the finished runs;
``--resume`` skips them (whatever ``--jobs`` was) and retries the failed ones. Then the
report (``report.md``, figures, a summary on the terminal) is made from ``results.json``.

``results.json`` schema (version 2)::

    {"schema": 2,
     "settings": {...the settings that shape the numbers...},
     "runs": [{"run_id": str, "task": "toy2d" | "toy3d" | "classification" | "lm",
               "dataset": str, "model": str, "optimizer": str, "weight_decay": float,
               "seed": int, "test_accuracy": float | null, "test_perplexity": float | null,
               "norm_start": float, "norm_end": float, "lr": float | null,
               "epochs": int | null, "steps": int, "seconds": float,
               "train_loss": float | null, "final_error": float | null, "curve": str}],
     "failed": [{"run_id": str, "task": str, "error": str}]}

``runs`` are in the suite's order whatever order they finished in. ``norm_*`` is the norm
of the scale-invariant weights (toys: ``‖w‖``; lm: of every weight AdamP tests, those with
two or more dimensions); ``test_perplexity`` is the lm task's held-out perplexity per byte;
``final_error`` is the toys' final angle to the optimum in degrees (2-D) or Rosenbrock value
(3-D); ``curve`` is the path of the run's curve file, relative to ``OUT`` (toys: ``norms``,
``errors``, ``path`` per step; classification: ``curve``, ``layers``, ``views``, see
``adampx.experiments.classification.RunResult``; lm: ``curve``, ``evals``, ``views``,
``invariant``, ``tested``, see ``adampx.experiments.lm.LMResult``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adampx.experiments import lm, toys
from adampx.experiments.classification import (
    OPTIMIZERS,
    TrainedRun,
    scale_invariant_names,
    train_classifier,
)
from adampx.experiments.data import DATASETS, DataSplits, load_dataset
from adampx.experiments.models import MODELS, build_model
from adampx.experiments.pool import Pool, available_cpus

__all__ = ["RunSpec", "Settings", "SettingsError", "default_jobs", "plan", "reproduce"]

SCHEMA = 2
TASKS = ("toy2d", "toy3d", "classification", "lm")
#: What runs without ``--tasks``: the lm task is asked for by name (about 1.5 minutes on two
#: cores, too long for the quick suite's 2 minutes).
DEFAULT_TASKS = ("toy2d", "toy3d", "classification")
# Parallel runs start with the longest, so that the short ones fill the gaps at the end.
_LONGEST_FIRST = {"lm": 0, "classification": 1, "toy3d": 2, "toy2d": 3}

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
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    seeds: list[int] | None = None
    lm_seeds: list[int] | None = None  # derived: --seeds, else the lm task's default
    epochs: int | None = None
    lm_steps: int | None = None
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
    jobs: int | None = None

    def resolved(self) -> Settings:
        """Fill the suite's defaults and check every name; raise :class:`SettingsError`."""
        if self.suite not in SUITE_SEEDS:
            raise SettingsError(f"unknown suite {self.suite!r}; choose from {list(SUITE_SEEDS)}")
        _check_names("task", self.tasks, TASKS)
        _check_names("optimizer", self.optimizers, tuple(OPTIMIZERS))
        _check_names("dataset", [self.dataset], DATASETS)
        _check_names("parallel mode", [self.parallel], ("ddp", "fsdp2"))
        if self.jobs is not None and (type(self.jobs) is not int or self.jobs < 1):
            raise SettingsError(
                f"--jobs must be a positive integer (runs at a time), got {self.jobs!r}"
            )
        if "lm" in self.tasks and not set(self.optimizers) & set(lm.LM_OPTIMIZERS):
            raise SettingsError(
                f"the lm task compares {' and '.join(lm.LM_OPTIMIZERS)}; --optimizers "
                f"{' '.join(self.optimizers)} holds neither"
            )
        model, batch, quick_epochs, full_epochs = DATASET_DEFAULTS[self.dataset]
        s = Settings(**asdict(self))
        s.model = self.model or model
        _check_names("model", [s.model], MODELS)
        s.batch_size = self.batch_size if self.batch_size is not None else batch
        if self.epochs is not None:
            s.epochs = self.epochs
        else:
            s.epochs = quick_epochs if self.suite == "quick" else full_epochs
        s.lm_steps = self.lm_steps if self.lm_steps is not None else lm.LM_STEPS[self.suite]
        s.seeds = self.seeds if self.seeds is not None else list(range(SUITE_SEEDS[self.suite]))
        s.lm_seeds = self.seeds if self.seeds is not None else list(range(lm.LM_SEEDS[self.suite]))
        if not s.seeds:
            raise SettingsError("--seeds needs at least one seed")
        if s.epochs < 1 or s.batch_size < 1:
            raise SettingsError("--epochs and --batch-size must be at least 1")
        if s.lm_steps < lm.EVALS:
            raise SettingsError(f"--lm-steps must be at least {lm.EVALS}, got {s.lm_steps}")
        return s

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the numbers (a resumed run must match them).

        ``world_size`` is the number of torchrun processes: each trains on its share of every
        batch-size-per-process epoch, so 1 and 2 processes give different numbers.
        ``threads_per_run``: the order of a reduction, and so its rounding, depends on the
        number of intra-op threads; each run has one, except under torchrun.
        """
        keys = ("dataset", "model", "epochs", "batch_size", "image_size", "lm_steps")
        fingerprint: dict[str, Any] = {k: getattr(self, k) for k in keys}
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        fingerprint["world_size"] = world_size
        fingerprint["threads_per_run"] = torch.get_num_threads() if world_size > 1 else 1
        return fingerprint


def default_jobs(device: torch.device) -> int:
    """Runs at a time without ``--jobs``: the usable CPUs on the CPU, one on a GPU."""
    return 1 if device.type == "cuda" else available_cpus()


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
    """The runs of the suite, in the suite's order (cheap toys first)."""
    runs: list[RunSpec] = []
    if "toy2d" in s.tasks:
        runs += [RunSpec(f"toy2d/{m}", "toy2d", m, toys.TOY2D_LR) for m in toys.TOY2D_METHODS]
    if "toy3d" in s.tasks:
        runs += [
            RunSpec(f"toy3d/{m}/lr={lr:g}", "toy3d", m, lr)
            for m in toys.TOY3D_METHODS
            for lr in toys.TOY3D_LRS
        ]
    assert s.seeds is not None
    if "classification" in s.tasks:
        for wd_on in (True, False):
            for opt in s.optimizers:
                if not wd_on and opt == "AdamW" and "Adam" in s.optimizers:
                    continue  # without weight decay AdamW is Adam
                for seed in s.seeds:
                    wd = "on" if wd_on else "off"
                    run_id = f"classification/{s.dataset}/{s.model}/{opt}/wd={wd}/seed={seed}"
                    runs.append(RunSpec(run_id, "classification", opt, None, seed, wd_on))
    if "lm" in s.tasks:
        assert s.lm_seeds is not None
        for opt in [o for o in s.optimizers if o in lm.LM_OPTIMIZERS]:
            for seed in s.lm_seeds:
                run_id = f"lm/{lm.TEXT_NAME}/{lm.MODEL_NAME}/{opt}/seed={seed}"
                runs.append(RunSpec(run_id, "lm", opt, lm.LR, seed))
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
    return {"schema": SCHEMA, "settings": s.fingerprint(), "runs": [], "failed": []}


# ---------------------------------------------------------------------------- one run


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


def _record(spec: RunSpec, **fields: Any) -> dict[str, Any]:
    """A results.json run record: every field of the schema, ``None`` where not given."""
    keys = (
        "dataset", "model", "optimizer", "weight_decay", "seed", "test_accuracy",
        "test_perplexity", "norm_start", "norm_end", "lr", "epochs", "steps", "seconds",
        "train_loss", "final_error", "curve",
    )  # fmt: skip
    unknown = set(fields) - set(keys)
    assert not unknown, unknown
    return {"run_id": spec.run_id, "task": spec.task, **{k: fields.get(k) for k in keys}}


def _trained_record(spec: RunSpec, result: TrainedRun, curve: str, **fields: Any) -> dict[str, Any]:
    """The record of a run that trained a model: its :class:`TrainedRun` fields and more."""
    measured = {f.name: getattr(result, f.name) for f in dataclasses.fields(TrainedRun)}
    return _record(spec, optimizer=spec.method, seed=spec.seed, curve=curve, **measured, **fields)


def _curve_path(out: Path, run_id: str) -> Path:
    safe = run_id.replace("/", "__").replace("=", "-").replace(" ", "_").replace("+", "p")
    return out / "curves" / f"{safe}.json"


class _Inputs:
    """What the runs share, made once per process on first use: the image data with the
    names of its model's scale-invariant weights, and the text."""

    def __init__(
        self,
        s: Settings,
        device: torch.device,
        data: DataSplits | None = None,
        text: lm.TextSplits | None = None,
    ) -> None:
        self.s, self.device, self._data, self._text = s, device, data, text
        self._invariant: set[str] | None = None

    def images(self) -> tuple[DataSplits, set[str]]:
        s = self.s
        if self._data is None:
            self._data = load_dataset(s.dataset, s.data_dir, seed=0, image_size=s.image_size)
        if self._invariant is None:
            assert s.model is not None
            data = self._data
            probe = build_model(s.model, data.num_classes, data.in_channels, data.image_size)
            self._invariant = scale_invariant_names(probe.to(self.device), data, self.device)
        return self._data, self._invariant

    def text(self) -> lm.TextSplits:
        if self._text is None:
            self._text = lm.load_text()
        return self._text


Progress = Callable[[int, int, float], None]


def _run_one(
    spec: RunSpec, s: Settings, inputs: _Inputs, device: torch.device, out: Path, on_step: Progress
) -> dict[str, Any]:
    """Run ``spec``, write its curve file (rank 0 only), return its results.json record."""
    curve_path = _curve_path(out, spec.run_id)
    curve = str(curve_path.relative_to(out))
    start = time.perf_counter()
    if spec.task in ("toy2d", "toy3d"):
        assert spec.lr is not None
        run = (
            toys.run_toy2d(spec.method)
            if spec.task == "toy2d"
            else toys.run_toy3d(spec.method, lr=spec.lr)
        )
        record = _record(
            spec,
            dataset="synthetic",
            model="2-D toy" if spec.task == "toy2d" else "3-D toy (Rosenbrock on the sphere)",
            optimizer=spec.method,
            weight_decay=run.weight_decay,
            seed=0,
            norm_start=run.norms[0],
            norm_end=run.norms[-1],
            lr=run.lr,
            steps=len(run.norms) - 1,
            seconds=time.perf_counter() - start,
            final_error=run.errors[-1],
            curve=curve,
        )
        payload: Any = {"norms": run.norms, "errors": run.errors, "path": run.path}
    elif spec.task == "classification":
        assert s.model is not None and s.epochs and s.batch_size
        data, invariant = inputs.images()
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
            progress=on_step,
            workers=s.workers,
            parallel=s.parallel,
        )
        record = _trained_record(
            spec,
            result,
            curve,
            dataset=s.dataset,
            model=s.model,
            test_accuracy=result.test_accuracy,
            epochs=s.epochs,
        )
        payload = {"curve": result.curve, "layers": result.layers, "views": result.views}
    else:
        assert s.lm_steps is not None
        lm_result = lm.train_lm(
            inputs.text(),
            optimizer_name=spec.method,
            seed=spec.seed,
            steps=s.lm_steps,
            progress=on_step,
        )
        record = _trained_record(
            spec,
            lm_result,
            curve,
            dataset=lm.TEXT_NAME,
            model=lm.MODEL_NAME,
            test_perplexity=lm_result.perplexity,
            lr=lm_result.lr,
        )
        payload = {
            k: getattr(lm_result, k)
            for k in ("curve", "evals", "views", "invariant", "tested", "parameters", "text")
        }
    if not _is_distributed() or torch.distributed.get_rank() == 0:
        _write_json(curve_path, payload)
    return record


def _make_handler(s: Settings, device: str) -> Callable[[RunSpec, Callable[[Any], None]], Any]:
    """A worker's handler (:class:`adampx.experiments.pool.Pool`): runs one spec."""
    where = torch.device(device)
    inputs = _Inputs(s, where)
    out = Path(s.out)

    def handle(spec: RunSpec, progress: Callable[[Any], None]) -> dict[str, Any]:
        return _run_one(spec, s, inputs, where, out, lambda *step: progress(step))

    return handle


# ---------------------------------------------------------------------------- the suite


def _label(run_id: str) -> str:
    """A run's short name for the progress bar: the optimizer, weight decay, seed, lr."""
    parts = run_id.split("/")
    if parts[0] == "classification":
        return "/".join(parts[3:])
    if parts[0] == "lm":
        return "lm/" + "/".join(parts[3:])
    return run_id


class _Progress:
    """One tqdm bar for the suite on stderr; its postfix shows each worker's run and step."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="suite", unit="run", disable=not enabled)
        self.enabled = enabled
        self.running: dict[int, str] = {}
        self._shown = 0.0

    def start(self, worker: int, spec: RunSpec) -> None:
        self.running[worker] = _label(spec.run_id)
        self._show(force=True)

    def step(self, worker: int, spec: RunSpec, step: int, total: int) -> None:
        self.running[worker] = f"{_label(spec.run_id)} {step}/{total}"
        self._show()

    def end(self, worker: int) -> None:
        self.running.pop(worker, None)
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def note(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)

    def _postfix(self) -> str:
        return " | ".join(f"[{w}] {self.running[w]}" for w in sorted(self.running))

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._shown > 0.25:
            self._shown = now
            self.bar.set_postfix_str(self._postfix(), refresh=True)

    def close(self) -> None:
        self.bar.close()


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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs in this process get one intra-op thread, as in a worker; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


class _Suite:
    """The runs to do and the results file they go to (written by rank 0 only)."""

    def __init__(self, s: Settings, results: dict[str, Any], main: bool) -> None:
        self.s, self.results, self.main = s, results, main
        self.out = Path(s.out)
        runs = plan(s)
        self.order = {r.run_id: i for i, r in enumerate(runs)}
        done = {r["run_id"] for r in results["runs"]}
        self.todo = [r for r in runs if r.run_id not in done]
        retried = {r.run_id for r in self.todo}
        results["failed"] = [f for f in results.get("failed", []) if f["run_id"] not in retried]
        self.progress = _Progress(0, enabled=False)

    def begin(self) -> None:
        """Show the suite's progress bar (after any message about the suite)."""
        self.progress = _Progress(len(self.todo), enabled=self.main)

    def done(self, spec: RunSpec, record: dict[str, Any], worker: int = 0) -> None:
        if self.main:
            runs = self.results["runs"]
            runs.append(record)
            runs.sort(key=lambda r: self.order.get(r["run_id"], -1))  # the suite's order
            _write_json(self.out / "results.json", self.results)
        self.progress.end(worker)

    def failed(self, spec: RunSpec, error: str, worker: int = 0) -> None:
        if self.main:
            failure = {"run_id": spec.run_id, "task": spec.task, "error": error}
            self.results["failed"].append(failure)
            _write_json(self.out / "results.json", self.results)
        last = error.strip().splitlines()[-1] if error.strip() else "no message"
        self.progress.note(f"run {spec.run_id} failed: {last}")
        self.progress.end(worker)

    def run_here(self, inputs: _Inputs, device: torch.device, *, keep_going: bool) -> None:
        """The runs one after the other in this process (``--jobs 1``, torchrun)."""
        for spec in self.todo:
            self.progress.start(0, spec)

            def on_step(step: int, total: int, loss: float, spec: RunSpec = spec) -> None:
                self.progress.step(0, spec, step, total)

            try:
                record = _run_one(spec, self.s, inputs, device, self.out, on_step)
            except Exception:
                if not keep_going:
                    raise
                self.failed(spec, traceback.format_exc())
            else:
                self.done(spec, record)

    def run_in_workers(self, jobs: int, device: torch.device) -> None:
        """The runs in ``jobs`` worker processes, the longest first."""
        queue = sorted(self.todo, key=lambda r: _LONGEST_FIRST[r.task])
        workers: dict[str, int] = {}  # run_id -> the index of the worker running it

        def started(worker: int, spec: RunSpec) -> None:
            workers[spec.run_id] = worker
            self.progress.start(worker, spec)

        def stepped(worker: int, spec: RunSpec, info: tuple[int, int, float]) -> None:
            self.progress.step(worker, spec, info[0], info[1])

        Pool(jobs, _make_handler, (self.s, str(device))).run(
            queue,
            on_start=started,
            on_progress=stepped,
            on_done=lambda spec, record: self.done(spec, record, workers.pop(spec.run_id, 0)),
            on_failed=lambda spec, error: self.failed(spec, error, workers.pop(spec.run_id, 0)),
        )


def reproduce(settings: Settings) -> dict[str, Any]:
    """Run the suite described by ``settings`` and write its report; returns the results."""
    from adampx.experiments.report import write_report

    s = settings.resolved()
    device = _device(s.device)
    if device.type == "cuda" and int(os.environ.get("LOCAL_RANK", "-1")) >= 0:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and s.jobs not in (None, 1):
        raise SettingsError(
            "--jobs: under torchrun the ranks share every run, one run after the other; "
            "drop --jobs (or run without torchrun to run the runs in parallel processes)"
        )
    # Bad data fails here, before any run or output folder exists.
    data: DataSplits | None = None
    if "classification" in s.tasks:
        data = load_dataset(s.dataset, s.data_dir, seed=0, image_size=s.image_size)
    text = lm.load_text() if "lm" in s.tasks else None
    with _distributed(device) as rank:
        main = rank == 0
        results = _prepare_out_on_rank0(s, main)
        suite = _Suite(s, results, main)
        done = len(results["runs"])
        if main and done:
            print(f"resuming: {done} runs done, {len(suite.todo)} to go", file=sys.stderr)
        inputs = _Inputs(s, device, data, text)
        jobs = 1 if distributed else min(s.jobs or default_jobs(device), max(1, len(suite.todo)))
        if main and suite.todo and not distributed:
            where = "in this process" if jobs == 1 else f"in {jobs} worker processes"
            print(f"{len(suite.todo)} runs {where}, one thread each", file=sys.stderr)
        suite.begin()
        try:
            if distributed:
                suite.run_here(inputs, device, keep_going=False)
            elif jobs == 1:
                with _one_thread():
                    suite.run_here(inputs, device, keep_going=True)
            else:
                suite.run_in_workers(jobs, device)
        except KeyboardInterrupt:
            suite.progress.close()
            if main:
                print(
                    f"\ninterrupted: {len(results['runs'])} finished runs are kept in "
                    f"{Path(s.out) / 'results.json'}; rerun with --resume to continue",
                    file=sys.stderr,
                )
            raise
        suite.progress.close()
        if main:
            write_report(Path(s.out), results)
    return results
