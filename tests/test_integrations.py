"""The recipes of docs/integrations.md, run as they are written there.

Each ``<!-- example: NAME -->`` code block of the page is executed as is, in a temporary
directory; the tests then read the objects it made. A recipe passes when a run resumed from
its checkpoint ends with exactly the weights of the run that was never interrupted, and the
same resume with the optimizer's state taken out of the checkpoint does not (so a checkpoint
that lost AdamP's state would fail). transformers, accelerate and lightning are imported
here directly: without them this module fails to import, it is not skipped.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import Trainer

from adampx import AdamP, Projected

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", re.S)
HF_RECIPES = {"hf-optimizer-cls": AdamP, "hf-optimizers": AdamP, "hf-projected": Projected}
TESTED = {"hf-setup", "hf-train", "hf-resume", *HF_RECIPES, "accelerate", "lightning"}


def examples() -> dict[str, str]:
    """The page's example blocks by name."""
    return dict(EXAMPLE.findall(DOC.read_text()))


def run(names: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Execute the named blocks one after the other in one namespace, in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    blocks = examples()
    namespace: dict[str, Any] = {"__name__": "docs_integrations"}
    for name in names:
        exec(compile(blocks[name], f"docs/integrations.md [{name}]", "exec"), namespace)
    return namespace


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().items(), b.state_dict().items(), strict=True)
    return all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in pairs)


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def test_every_example_of_the_page_is_tested() -> None:
    assert set(examples()) == TESTED


@pytest.mark.parametrize("recipe", list(HF_RECIPES))
def test_hugging_face_trainer_resumes_to_the_same_weights(
    recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = run(["hf-setup", recipe, "hf-train", "hf-resume"], tmp_path, monkeypatch)
    trainer, resumed = ns["trainer"], ns["resumed"]
    for t in (trainer, resumed):
        assert isinstance(t, Trainer)
        assert type(unwrapped(t.optimizer)) is HF_RECIPES[recipe]
    assert same_weights(trainer.model, resumed.model)
    assert not same_weights(trainer.model, ns["make_model"]())  # it trained

    checkpoint = tmp_path / "out" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    key = "projected_delta" if recipe == "hf-projected" else "delta"
    assert all(key in group for group in saved["param_groups"])
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["state"][0])
    if recipe == "hf-optimizer-cls":  # the Trainer's groups: decay from args, none on 1-d
        groups = unwrapped(trainer.optimizer).param_groups
        assert [g["weight_decay"] for g in groups] == [ns["args"].weight_decay, 0.0]

    stateless = tmp_path / "out" / "without-optimizer-state"
    shutil.copytree(checkpoint, stateless)
    (stateless / "optimizer.pt").unlink()  # the Trainer then starts AdamP afresh
    broken = ns["make_trainer"]()
    broken.train(resume_from_checkpoint=str(stateless))
    assert not same_weights(trainer.model, broken.model)


def test_accelerate_loop_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = run(["accelerate"], tmp_path, monkeypatch)
    assert type(unwrapped(ns["optimizer"])) is AdamP
    assert same_weights(ns["model"], ns["resumed"])
    assert not same_weights(ns["model"], ns["make_model"]())

    accelerator = Accelerator()
    fresh = ns["make_model"]()
    fresh, optimizer = accelerator.prepare(
        fresh, AdamP(fresh.parameters(), lr=1e-2, weight_decay=1e-2)
    )
    accelerator.load_state("state")
    unwrapped(optimizer).state.clear()  # the weights restored, AdamP's state not
    ns["accelerator"] = accelerator  # the one the example's train() calls
    ns["train"](fresh, optimizer, ns["batches"][3:])
    assert not same_weights(ns["model"], fresh)


def test_lightning_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = run(["lightning"], tmp_path, monkeypatch)
    model, resumed = ns["model"], ns["resumed"]
    assert isinstance(model.trainer, L.Trainer)
    assert [type(o) for o in model.trainer.optimizers] == [AdamP]
    assert same_weights(model, resumed)  # buffers (BatchNorm's statistics) included
    assert not same_weights(model, ns["Classifier"]())

    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=False)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(checkpoint["optimizer_states"][0]["state"][0])
    checkpoint["optimizer_states"][0]["state"] = {}
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    broken = ns["Classifier"]()
    ns["make_trainer"]().fit(broken, ns["loader"], ckpt_path=str(tmp_path / "stateless.ckpt"))
    assert not same_weights(model, broken)
