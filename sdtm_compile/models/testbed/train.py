"""Train the testbed with rectified flow (SD3's objective) on package-shipped images: :func:`train_testbed`.

Objective (SD3, Esser et al. 2024): ``x_t = (1 - sigma) x0 + sigma eps``, the model predicts ``eps - x0``
(mean squared error), ``sigma = sigmoid(n)`` with ``n ~ N(0, 1)`` (logit-normal). Two phases: 32x32 crops (the
64x64 crops average-pooled; 256 tokens, ~5x cheaper per example) teach colour and layout, then 64x64 crops (1024
tokens, the resolution the testbed is used at) teach detail. The weights shipped are an exponential moving
average of the trained ones.

Reproducible and resumable: every step draws its batch, noise and sigmas from a generator seeded with
``(seed, step)``, so a run resumed from a checkpoint (written every ``checkpoint_every`` steps, atomically)
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..._pyplot import pyplot
from .data import SOURCES, fixed_crops, sample_batch
from .model import TestbedModel, new_testbed, save_testbed, testbed_spec

__all__ = [
    "plot_training_log",
    "TrainConfig",
    "train_testbed",
    "train_step",
    "training_batch",
    "flow_matching_loss",
    "EvalSet",
    "make_eval_set",
    "eval_losses",
]

logger = logging.getLogger(__name__)

#: Noise levels of the fixed evaluation losses (train and held out).
EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class TrainConfig:
    """How the testbed is trained (the defaults made the shipped weights).

    Attributes:
        model: which testbed (a key of :data:`~sdtm_compile.models.testbed.model.TESTBEDS`): ``"testbed-1024"``
            (4 blocks) or ``"testbed12-1024"`` (12 blocks; trained with :meth:`deep`).
        out_dir: checkpoint, loss log (``loss.jsonl``, ``loss.png``) and, by default, the final weights of this run.
        weights: where the final (EMA) weights and their manifest (same path, ``.json``) are written; ``None``:
            ``out_dir/<model>.safetensors``. The shipped weights were written to the package's
            (``--weights sdtm_compile/models/testbed/weights/<model>.safetensors``).
        storage: how the final weights are stored (``"float16"``; ``"int8"`` rows for the 12-block testbed, whose
            float16 file would be 31 MB); not part of what a resumed run must match.
        steps_low: steps on 32x32 crops (batch ``batch_low``).
        steps_full: steps on 64x64 crops (batch ``batch_full``).
        lr: AdamW peak learning rate (linear warm-up over ``warmup`` steps, cosine decay to 10 % at the end).
        ema_decay: decay of the weight average that is shipped.
        label_dropout: probability of dropping each label, and the whole prompt (for classifier-free guidance).
        checkpoint_every: steps between checkpoints (resume point).
        eval_every: steps between evaluations of the fixed train / held-out losses (EMA weights).
        eval_crops: crops per evaluation set.
        seed: seed of the weights, the batches and the noise.
        threads: torch intra-op threads (``None``: torch's default).
    """

    model: str = "testbed-1024"
    out_dir: str = "testbed_run"
    weights: str | None = None
    storage: str = "float16"
    steps_low: int = 2000
    batch_low: int = 16
    steps_full: int = 1600
    batch_full: int = 8
    lr: float = 3e-4
    warmup: int = 100
    ema_decay: float = 0.998
    label_dropout: float = 0.1
    checkpoint_every: int = 100
    eval_every: int = 400
    eval_crops: int = 32
    seed: int = 0
    threads: int | None = None

    @classmethod
    def deep(cls, **overrides) -> TrainConfig:
        """How ``testbed12-1024`` is trained: 3x the blocks, so about 3x the time per step (1.36 s per 32x32 step
        of 16, 3.82 s per 64x64 step of 8 on 2 cores, measured): the testbed's 2000 low-resolution steps and a quarter
        of its 1600 full-resolution ones, ~70 min, so that it trains in one working session beside the measurements
        that need it; stored as int8 rows."""
        settings = dict(model="testbed12-1024", out_dir="testbed12_run", steps_low=2000, steps_full=400, storage="int8")
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        testbed_spec(self.model)
        if self.storage not in ("float16", "int8"):
            raise ValueError(f"TrainConfig.storage={self.storage!r} is invalid: expected 'float16' or 'int8'")
        for name in ("steps_low", "steps_full", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} is invalid: expected >= 0")
        for name in ("batch_low", "batch_full", "checkpoint_every", "eval_every", "eval_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} is invalid: expected >= 1")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.label_dropout < 1 or self.lr <= 0:
            raise ValueError("TrainConfig: expected 0 <= ema_decay < 1, 0 <= label_dropout < 1 and lr > 0")

    @property
    def total_steps(self) -> int:
        return self.steps_low + self.steps_full


def flow_matching_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the velocity ``model(x_t, labels, sigma)`` predicts at
    ``x_t = (1 - sigma) x0 + sigma eps`` against ``eps - x0`` (``model``: a :class:`TestbedModel` or anything
    called like one)."""
    s = sigma.view(-1, 1, 1, 1)
    prediction = model(((1 - s) * x0 + s * eps), labels, sigma)
    return F.mse_loss(prediction.float(), (eps - x0).float())


@dataclass(frozen=True)
class EvalSet:
    """Fixed crops ``[B, 3, 64, 64]``, labels ``[B, 6]`` and noise ``[B, 3, 64, 64]``: the same in every process."""

    x0: torch.Tensor
    labels: torch.Tensor
    eps: torch.Tensor


def make_eval_set(split: str, count: int = 32, seed: int = 1234) -> EvalSet:
    x0, labels = fixed_crops(split, count, seed)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    return EvalSet(x0, labels, eps)


@torch.no_grad()
def eval_losses(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    evalset: EvalSet,
    sigmas=EVAL_SIGMAS,
    batch: int = 16,
) -> dict[float, float]:
    """Flow-matching loss per sigma on ``evalset`` (deterministic: fixed crops, noise and sigmas)."""
    losses = {}
    for sigma in sigmas:
        total = 0.0
        for i in range(0, len(evalset.x0), batch):
            x0, labels, eps = (t[i : i + batch] for t in (evalset.x0, evalset.labels, evalset.eps))
            s = torch.full((len(x0),), float(sigma))
            total += flow_matching_loss(model, x0, labels, eps, s).item() * len(x0)
        losses[float(sigma)] = total / len(evalset.x0)
    return losses


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.total_steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops ``[B, 3, s, s]``, labels ``[B, 6]``, noise and sigmas ``[B]`` of ``step``, from a generator seeded
    with (seed, step): the same batch whenever the step runs (first run or resumed)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    low = step < config.steps_low
    x0, labels = sample_batch("train", config.batch_low if low else config.batch_full, g, config.label_dropout)
    if low:
        x0 = F.avg_pool2d(x0, 2)
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=g))
    return x0, labels, eps, sigma


def train_step(
    model: TestbedModel,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
) -> float:
    """One optimiser step on ``batch`` (gradients clipped to norm 1); returns the loss before the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = flow_matching_loss(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save leaves the previous checkpoint intact


def train_testbed(
    config: TrainConfig = TrainConfig(), progress: bool = True, max_steps: int | None = None
) -> dict | None:
    """Train (or resume) the testbed; write the EMA weights and their manifest. Returns the manifest.

    ``max_steps``: stop after this many steps of this call (a time-sliced run; resume by calling again), returning
    ``None`` while training is not finished.
    """
    from tqdm.auto import tqdm

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    torch.manual_seed(config.seed)
    spec = testbed_spec(config.model)
    model = new_testbed(config.seed, spec)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    start, wall, log = 0, 0.0, []
    if checkpoint.exists():
        try:
            state = torch.load(checkpoint, weights_only=True)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as error:
            raise RuntimeError(
                f"cannot resume from {checkpoint} ({error}): delete it to start over, or pick another out_dir"
            ) from error
        # where files go and how many threads run do not change the result; everything else must match
        where = {"out_dir", "weights", "threads", "storage"}
        saved, now = ({k: v for k, v in c.items() if k not in where} for c in (state["config"], asdict(config)))
        if saved != now:
            changed = sorted(k for k in now if saved.get(k) != now[k])
            raise RuntimeError(
                f"{checkpoint} was written by another TrainConfig (differs in {changed}): resume with the same "
                "settings, or delete the checkpoint / pick another out_dir to start over"
            )
        start, wall, log = state["step"], state["wall_s"], state["log"]
        logger.info("resuming from %s at step %d", checkpoint, start)
    train_set, heldout_set = make_eval_set("train", config.eval_crops), make_eval_set("heldout", config.eval_crops)

    bar = tqdm(total=config.total_steps, initial=start, desc="train-testbed", disable=not progress)
    model.train()
    running, began = None, time.perf_counter()
    end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
    for step in range(start, end):
        batch = training_batch(config, step)
        loss = train_step(model, optimizer, batch, _learning_rate(config, step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - config.ema_decay)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        done, side = step + 1, batch[0].shape[-1]
        entry = {"step": done, "loss": round(loss, 5), "side": side}
        if done % config.eval_every == 0 or done == config.total_steps:
            entry["train_eval"] = eval_losses(ema, train_set)
            entry["heldout_eval"] = eval_losses(ema, heldout_set)
            logger.info("step %d: held-out loss %s", done, entry["heldout_eval"])
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", side=side)
        if done % config.checkpoint_every == 0 or done in (config.total_steps, end):
            elapsed = wall + time.perf_counter() - began
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "wall_s": elapsed,
                "log": log,
                "config": asdict(config),
            }
            _save_checkpoint(checkpoint, state)
            (out / "loss.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    bar.close()
    wall += time.perf_counter() - began
    if end < config.total_steps:
        logger.info("stopped at step %d of %d (max_steps); run again to resume", end, config.total_steps)
        return None

    final = next(e for e in reversed(log) if "heldout_eval" in e) if log else None
    random_init = new_testbed(config.seed, spec).eval()
    random_heldout = eval_losses(random_init, heldout_set)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    manifest = {
        "training": {
            "objective": "rectified flow: x_t = (1 - s) x0 + s eps, target eps - x0, s = sigmoid(N(0, 1))",
            "steps": config.total_steps,
            "wall_s": round(wall, 1),
            "config": asdict(config),
            "eval_sigmas": list(EVAL_SIGMAS),
            "final_train_loss": final and round(mean(final["train_eval"]), 5),
            "final_heldout_loss": final and round(mean(final["heldout_eval"]), 5),
            "random_init_heldout_loss": round(mean(random_heldout), 5),
            "heldout_loss_per_sigma": final and {str(k): round(v, 5) for k, v in final["heldout_eval"].items()},
            "random_init_heldout_loss_per_sigma": {str(k): round(v, 5) for k, v in random_heldout.items()},
        },
        "images": [asdict(s) for s in SOURCES],
    }
    try:
        plot_training_log(out / "loss.jsonl", out / "loss.png", manifest["training"]["random_init_heldout_loss"])
    except ImportError as error:  # matplotlib is optional: the weights matter, the picture can be drawn later
        logger.warning("no loss curve drawn (%s); the log is %s", error, out / "loss.jsonl")
    weights = Path(config.weights) if config.weights is not None else out / f"{config.model}.safetensors"
    manifest = save_testbed(ema, weights, manifest, config.model, config.storage)
    if config.storage != "float16":  # what storage costs: the stored weights' held-out loss beside the trained ones'
        from .model import load_testbed

        stored = eval_losses(load_testbed(weights, name=config.model), heldout_set)
        manifest["training"]["stored_heldout_loss"] = round(mean(stored), 5)
        weights.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def plot_training_log(log_path: str | Path, path: str | Path, random_init_heldout: float | None = None) -> str:
    """The loss curve of a run's ``loss.jsonl``: batch loss (smoothed, per phase) and the fixed train / held-out
    evaluations of the EMA weights, beside the held-out loss of random weights when given."""
    plt = pyplot()
    log = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for side, colour in ((32, "#8fa9d6"), (64, "#1f3b73")):
        steps = [e["step"] for e in log if e["side"] == side]
        losses = [e["loss"] for e in log if e["side"] == side]
        smooth, value = [], None
        for loss in losses:
            value = loss if value is None else 0.98 * value + 0.02 * loss
            smooth.append(value)
        if steps:
            ax.plot(steps, smooth, color=colour, lw=1.2, label=f"batch loss, {side}x{side} crops (smoothed)")
    evals = [e for e in log if "heldout_eval" in e]
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    for key, marker, label in (("train_eval", "s", "train crops"), ("heldout_eval", "o", "held-out images")):
        ax.plot(
            [e["step"] for e in evals],
            [mean(e[key]) for e in evals],
            marker + "-",
            color="#a0451b" if key == "heldout_eval" else "#5a8f29",
            label=f"EMA weights, 64x64 {label} (fixed x0, eps, sigma)",
        )
    if random_init_heldout is not None:
        ax.axhline(random_init_heldout, color="black", ls=":", lw=1, label="random weights, held-out images")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching loss (MSE of eps - x0)")
    ax.set_title("testbed-1024 training")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
