"""The step logic the Triton pipeline model runs: the sampling loop, CFG and the engines' state, in numpy only.

This file is copied into the pipeline model's directory of an exported model repository and imported there by
Triton's Python backend, whose process has numpy but not torch or diffusers (NGC's ``tritonserver`` images), so it
imports nothing of ours. It is also imported in-process by :mod:`sdtm_compile.deploy.triton` and the tests, which
check it against the diffusers scheduler and :class:`~sdtm_compile.deploy.OnnxTransformer`.

Everything that needs torch, diffusers or our schedule was decided at export time and written to
``step_table.json``: for every step count ``S`` up to ``max_steps``, each step's engine (the index of the (stage,
bucket) graph in the one engine model, fed as its ``engine`` input: what
:class:`~sdtm_compile.runtime.StageDispatcher` picks from that step's timestep), its plans' counts (a bundle with
exact counts), the timestep value the transformer is fed and the Euler step ``dt = sigma_next - sigma`` of the diffusers
``FlowMatchEulerDiscreteScheduler``, and whether the step is protected (SDTM's cache fusion: it runs the unmerged
engine, which writes the cache the next steps' merged engines read). The method's state (SDTM's ``li``) starts from
``initial_state.npy`` at every request, any other carried state (the fusion cache) from zeros; it lives in
:func:`denoise`'s locals only, so concurrent requests never share it.

What it does not handle: one transformer call per step (CFG batched into one call, as the diffusers pipelines do);
a request's ``num_inference_steps`` above the table's ``max_steps`` is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "STEP_TABLE",
    "INITIAL_STATE",
    "Step",
    "StepTable",
    "RequestError",
    "Cancelled",
    "RepositoryFileError",
    "denoise",
    "verify_files",
]

STEP_TABLE = "step_table.json"
INITIAL_STATE = "initial_state.npy"
#: ``step_table.json`` layout version (bumped when the file's meaning changes; 3: every step records its counts;
#: 4: and whether it is protected, and the engines may carry more state than the method's).
TABLE_VERSION = 4


class RepositoryFileError(RuntimeError):
    """A file of the model repository is missing or not the one exported (corrupt or tampered)."""


class RequestError(ValueError):
    """A request the pipeline cannot serve; the message says what was wrong and what to send instead."""


class Cancelled(RuntimeError):
    """The client went away (Triton marked the request cancelled) before the generation finished."""


@dataclass(frozen=True)
class Step:
    """One denoising step: the engine (graph index in the engine model), the timestep fed to the transformer,
    ``sigma_next - sigma``, each plan's count (a bundle with exact counts; empty with static buckets) and whether
    the step is protected (cache fusion: the unmerged engine runs and writes the cache)."""

    engine: int
    timestep: np.float32
    dt: np.float32
    counts: tuple[int, ...] = ()
    protected: bool = False


@dataclass(frozen=True)
class StepTable:
    """What ``step_table.json`` says: every step of every step count, the request's inputs and the state.

    ``inputs``: the transformer inputs the client sends as they are (name -> static shape); ``latent_shape``: the
    client's latent ``[B_img, ...]``; ``grid``: its image-token grid ``(h, w)``; ``cfg``: the transformer batch is
    ``[uncond; cond]`` of the latent, guided by ``guidance_scale``; ``guidance``: the transformer takes a distilled
    ``guidance`` input (FLUX.1-dev), filled from the request's ``guidance`` value; ``state`` / ``state_output``: the
    engines' state input and output names; ``engine_model``: the Triton model that runs every engine, picked by its
    ``engine_input``; ``engines``: each engine index's name (``structure@0.6``), for logs; ``count_inputs``: a
    bundle with exact counts: the engine model's count inputs, each fed a ``uint8`` array of length
    ``tokens - count`` at every step (the step's ``counts``); ``extra_state``: the engines' other carried state
    (cache fusion's ``cache``) as ``(input, output, shape, dtype)``, zeros at the start of every request.
    """

    steps: Mapping[int, tuple[Step, ...]]
    inputs: Mapping[str, tuple[int, ...]]
    latent_shape: tuple[int, ...]
    grid: tuple[int, int]
    batch: int
    cfg: bool
    guidance: bool
    state: str
    state_output: str
    sample: str
    default_steps: int
    default_guidance_scale: float
    default_guidance: float
    engine_model: str
    engine_input: str
    engines: tuple[str, ...]
    count_inputs: tuple[str, ...] = ()
    tokens: int = 0
    extra_state: tuple[tuple[str, str, tuple[int, ...], str], ...] = ()

    @property
    def max_steps(self) -> int:
        return max(self.steps)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The engine model's outputs a step reads, in the order ``run_engine`` returns them: the sample, the
        method's state, then every other carried state."""
        return (self.sample, self.state_output, *(output for _, output, _, _ in self.extra_state))

    @classmethod
    def from_dict(cls, data: Mapping) -> StepTable:
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"step table version {data.get('version')!r} is not {TABLE_VERSION}; re-export")
        steps = {
            int(count): tuple(
                Step(int(e), np.float32(t), np.float32(dt), tuple(map(int, c)), bool(p)) for e, t, dt, c, p in rows
            )
            for count, rows in data["steps"].items()
        }
        return cls(
            steps=steps,
            inputs={name: tuple(shape) for name, shape in data["inputs"].items()},
            latent_shape=tuple(data["latent_shape"]),
            grid=tuple(data["grid"]),
            batch=int(data["batch"]),
            cfg=bool(data["cfg"]),
            guidance=bool(data["guidance"]),
            state=data["state"],
            state_output=data["state_output"],
            sample=data["sample"],
            default_steps=int(data["default_steps"]),
            default_guidance_scale=float(data["default_guidance_scale"]),
            default_guidance=float(data["default_guidance"]),
            engine_model=data["engine_model"],
            engine_input=data["engine_input"],
            engines=tuple(data["engines"]),
            count_inputs=tuple(data.get("count_inputs", ())),
            tokens=int(data.get("tokens", 0)),
            extra_state=tuple(
                (e["name"], e["output"], tuple(e["shape"]), e["dtype"]) for e in data.get("extra_state", ())
            ),
        )

    @classmethod
    def load(cls, folder: str | Path) -> StepTable:
        return cls.from_dict(json.loads((Path(folder) / STEP_TABLE).read_text()))

    def schedule(self, num_steps: int) -> tuple[Step, ...]:
        """The steps of a ``num_steps`` generation (a :class:`RequestError` outside ``1..max_steps``)."""
        if num_steps not in self.steps:
            raise RequestError(
                f"num_inference_steps={num_steps} is outside 1..{self.max_steps}, the step counts this repository "
                f"was exported for; send a count in that range, or re-export with a larger --max-steps"
            )
        return self.steps[num_steps]


#: ``run_engine(model_name, feeds) -> (sample, state, *extra state)``: one transformer call (``feeds`` name the
#: engine; the outputs in the order of :attr:`StepTable.outputs`).
EngineCall = Callable[[str, dict[str, np.ndarray]], tuple[np.ndarray, ...]]


def denoise(
    table: StepTable,
    initial_state: np.ndarray,
    request: Mapping[str, np.ndarray],
    run_engine: EngineCall,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance: float | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> np.ndarray:
    """Denoise ``request["latents"]`` (``table.latent_shape``) for ``num_steps`` steps; returns the final latent.

    ``request`` holds the latent and every input of ``table.inputs``. Per step: the transformer batch (the latent,
    twice with CFG), the step's timestep for every row, the pass-through inputs and the state go to
    ``run_engine``; CFG combines ``uncond + guidance_scale * (cond - uncond)``; the Euler step is
    ``latent + dt * noise`` in float32, as diffusers' scheduler computes it. ``cancelled()`` is asked after each
    step (:class:`Cancelled` when it says yes). Shapes and dtypes were checked by Triton against the model's
    config; the values are checked here.
    """
    num_steps = table.default_steps if num_steps is None else int(num_steps)
    guidance_scale = table.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    guidance = table.default_guidance if guidance is None else float(guidance)
    steps = table.schedule(num_steps)
    if not np.isfinite(guidance_scale) or not np.isfinite(guidance):
        raise RequestError(f"guidance_scale={guidance_scale} / guidance={guidance}: send finite numbers")
    latents = np.array(request["latents"], dtype=np.float32, copy=True)
    if tuple(latents.shape) != table.latent_shape:
        raise RequestError(f"latents has shape {list(latents.shape)}, this model takes {list(table.latent_shape)}")
    if not np.isfinite(latents).all():
        raise RequestError("latents contains NaN or infinity: send finite noise")
    fixed = {name: np.ascontiguousarray(request[name]) for name in table.inputs}
    if table.guidance:
        fixed["guidance"] = np.full((table.batch,), guidance, dtype=np.float32)
    state = np.array(initial_state, copy=True)
    # the engines' other state (the fusion cache): zeros, written by the first protected step before any read
    extra = {name: np.zeros(shape, dtype) for name, _, shape, dtype in table.extra_state}
    scale = np.float32(guidance_scale)
    for number, step in enumerate(steps, 1):
        hidden = np.concatenate([latents, latents]) if table.cfg else latents
        feeds = {
            **fixed,
            "hidden_states": hidden,
            "timestep": np.full((table.batch,), step.timestep, dtype=np.float32),
            table.state: state,
            **extra,
            table.engine_input: np.array([step.engine], dtype=np.int64),
            # exact counts: each count is the length of its count input (N - count; values never read)
            **{name: np.zeros(table.tokens - c, np.uint8) for name, c in zip(table.count_inputs, step.counts)},
        }
        sample, state, *carried = run_engine(table.engine_model, feeds)
        extra = dict(zip(extra, carried))
        noise = sample.astype(np.float32, copy=False)
        if table.cfg:
            uncond, cond = np.split(noise, 2)
            noise = uncond + scale * (cond - uncond)
        latents = (latents + step.dt * noise).astype(np.float32, copy=False)
        if cancelled():
            raise Cancelled(f"cancelled by the client after {number} of {num_steps} steps")
    return latents


def verify_files(repository: str | Path, manifest_path: str | Path) -> int:
    """Check that every file ``repository_manifest.json`` lists exists under ``repository`` with its sha256;
    returns how many files were checked, or raises :class:`RepositoryFileError` naming the first bad file."""
    repository = Path(repository)
    try:
        listed = json.loads(Path(manifest_path).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise RepositoryFileError(f"{manifest_path}: unreadable repository manifest ({err}); re-export") from err
    for relative, digest in listed.items():
        path = repository / relative
        if not path.is_file():
            raise RepositoryFileError(f"{path}: listed in {manifest_path} but missing; re-export the repository")
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != digest:
            raise RepositoryFileError(
                f"{path}: sha256 {sha.hexdigest()[:16]}... does not match {digest[:16]}... listed in "
                f"{manifest_path} (file corrupt or tampered); re-export the repository"
            )
    return len(listed)
