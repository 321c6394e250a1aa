"""Clients of a served repository: request building, reference outputs and a concurrent load run.

Every response is checked against a reference computed in-process from the *bundle* by the library path a user
runs without a server (:class:`~sdtm_compile.deploy.OnnxTransformer` in diffusers' scheduler loop,
:func:`~sdtm_compile.models.sampling.generate` / :func:`~sdtm_compile.models.sampling.flux_generate`), so a
response that lost steps, took another request's ``li`` or came back for the wrong request does not pass.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.sampling import (
    FluxGenerationInputs,
    GenerationInputs,
    diffusers_call,
    flux_generate,
    generate,
)
from ...models.specs import flux_image_ids
from .step_logic import StepTable

__all__ = [
    "ServedRequest",
    "LoadResult",
    "make_request",
    "reference_output",
    "infer",
    "run_load",
    "load_markdown",
    "plot_load",
    "read_results",
    "save_results",
]

logger = logging.getLogger(__name__)

_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}


@dataclass(frozen=True)
class ServedRequest:
    """One request of the mix: its seed, step count, CFG scale and the arrays sent."""

    seed: int
    num_steps: int
    guidance_scale: float | None  #: ``None``: the model runs no CFG (Flux)
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def label(self) -> str:
        cfg = "" if self.guidance_scale is None else f", cfg {self.guidance_scale:g}"
        return f"seed {self.seed}, {self.num_steps} steps{cfg}"


def make_request(table: StepTable, seed: int, num_steps: int, guidance_scale: float = 7.0) -> ServedRequest:
    """Seeded noise and random "prompt embeddings" of the repository's shapes (Flux: the real position ids; CFG:
    the unconditional rows zero, as ``make_generation_inputs`` makes them)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"latents": rng.standard_normal(table.latent_shape, dtype=np.float32)}
    for name, shape in table.inputs.items():
        if name == "img_ids":
            arrays[name] = flux_image_ids(*table.grid).numpy()
        elif name == "txt_ids":
            arrays[name] = np.zeros(shape, dtype=np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
            if table.cfg:
                value[: shape[0] // 2] = 0.0
            arrays[name] = value
    arrays["num_inference_steps"] = np.array([num_steps], dtype=np.int32)
    if table.cfg:
        arrays["guidance_scale"] = np.array([guidance_scale], dtype=np.float32)
    return ServedRequest(seed, num_steps, guidance_scale if table.cfg else None, arrays)


@torch.no_grad()
def reference_output(runner, table: StepTable, request: ServedRequest) -> np.ndarray:
    """The denoised latent of ``request`` from ``runner`` (an :class:`OnnxTransformer` of the bundle) in
    diffusers' scheduler loop, as a user runs the bundle without a server."""
    arrays = {name: torch.from_numpy(value) for name, value in request.arrays.items()}
    runner.reset()
    if table.cfg:
        half = table.batch // 2
        inputs = GenerationInputs(
            latents=arrays["latents"],
            prompt_embeds=arrays["encoder_hidden_states"][half:],
            pooled_prompt_embeds=arrays["pooled_projections"][half:],
            negative_prompt_embeds=arrays["encoder_hidden_states"][:half],
            negative_pooled_prompt_embeds=arrays["pooled_projections"][:half],
        )
        shift = runner.method_config.timestep_shift
        out = generate(diffusers_call(runner), inputs, request.num_steps, request.guidance_scale, shift)
    else:
        inputs = FluxGenerationInputs(
            latents=arrays["latents"],
            prompt_embeds=arrays["encoder_hidden_states"],
            pooled_prompt_embeds=arrays["pooled_projections"],
            img_ids=arrays["img_ids"],
            txt_ids=arrays["txt_ids"],
            guidance=table.default_guidance if table.guidance else None,
        )
        out = flux_generate(runner, inputs, request.num_steps)
    return out.numpy()


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol {protocol!r} must be 'http' or 'grpc'")
    return module


def client(protocol: str, url: str, **kwargs: Any):
    """A ``tritonclient`` ``InferenceServerClient`` for ``protocol`` (``"http"`` or ``"grpc"``)."""
    return _client_module(protocol).InferenceServerClient(url, **kwargs)


def infer(protocol: str, connection, model: str, arrays: dict[str, np.ndarray], **kwargs: Any) -> np.ndarray:
    """Send ``arrays`` to ``model`` and return its ``denoised`` output (raises ``InferenceServerException``)."""
    module = _client_module(protocol)
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), _TYPES.get(value.dtype, "FP64"))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return connection.infer(model, inputs, **kwargs).as_numpy("denoised")


@dataclass
class LoadResult:
    """One (protocol, concurrency) point of a load run."""

    protocol: str
    concurrency: int
    requests: int
    replicas: int
    completed: int  #: responses received and compared (the others are in ``errors``)
    wall_s: float
    throughput: float  #: generations per second
    p50_s: float
    p95_s: float
    errors: list[str]
    mismatches: list[str]
    max_abs_error: float
    server_rss_mib: float | None = None  #: server + stubs resident memory after this point (``serve-bench``)

    @property
    def ok(self) -> bool:
        """Every request answered, and every answer equal to its reference."""
        return self.completed == self.requests and not self.errors and not self.mismatches


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(
    protocol: str,
    url: str | Sequence[str],
    model: str,
    mix: Sequence[ServedRequest],
    references: Sequence[np.ndarray],
    concurrency: int,
    total: int,
    atol: float = 1e-5,
) -> LoadResult:
    """``concurrency`` client threads send ``total`` requests, cycling through ``mix`` in a fixed order; each
    response is compared with its reference (max abs difference ``<= atol``). ``url``: one server, or several
    replicas of one repository, which then take the requests round-robin (request ``n`` goes to replica
    ``n % replicas``, what a round-robin load balancer does; each thread keeps one connection per replica)."""
    urls = [url] if isinstance(url, str) else list(url)
    lock = threading.Lock()
    order = [i % len(mix) for i in range(total)]
    cursor = iter(range(total))
    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[str] = []
    worst = [0.0]

    def worker() -> None:
        connections = [client(protocol, u) for u in urls]
        while True:
            with lock:
                number = next(cursor, None)
            if number is None:
                return
            request = mix[order[number]]
            start = time.perf_counter()
            try:
                output = infer(protocol, connections[number % len(urls)], model, request.arrays)
            except Exception as err:  # noqa: BLE001  (recorded, reported, and the run fails)
                with lock:
                    errors.append(f"request {number} ({request.label}): {err}")
                continue
            elapsed = time.perf_counter() - start
            difference = float(np.abs(output - references[order[number]]).max())
            with lock:
                latencies.append(elapsed)
                worst[0] = max(worst[0], difference)
                if not difference <= atol:
                    mismatches.append(f"request {number} ({request.label}): max |diff| {difference:.3g}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return LoadResult(
        protocol,
        concurrency,
        total,
        len(urls),
        len(latencies),
        wall,
        len(latencies) / wall,
        _percentile(latencies, 50),  # the median: numpy's linear percentile at 50 averages the middle two
        _percentile(latencies, 95),
        errors,
        mismatches,
        worst[0],
    )


def load_markdown(results: Sequence[LoadResult], baseline_s: float | None = None) -> str:
    """The load table (and, given, the in-process time of one generation for scale)."""
    lines = [
        "| protocol | replicas | clients | requests | throughput (gen/s) | p50 latency | p95 latency "
        "| checked vs reference | servers' RSS after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        checked = f"{r.completed - len(r.mismatches)}/{r.requests} equal (max diff {r.max_abs_error:.1g})"
        if r.errors:
            checked += f", {len(r.errors)} errors"
        if r.mismatches:
            checked += f", {len(r.mismatches)} mismatched"
        lines.append(
            f"| {r.protocol} | {r.replicas} | {r.concurrency} | {r.requests} | {r.throughput:.2f} "
            f"| {r.p50_s * 1e3:.0f} ms | {r.p95_s * 1e3:.0f} ms | {checked} "
            f"| {'-' if r.server_rss_mib is None else f'{r.server_rss_mib:.0f} MiB'} |"
        )
    if baseline_s is not None:
        lines.append("")
        lines.append(f"In-process reference (OnnxTransformer, one generation at a time): {1 / baseline_s:.2f} gen/s.")
    return "\n".join(lines)


def plot_load(results: Sequence[LoadResult], path: str | Path, title: str, baseline_s: float | None = None) -> Path:
    """Throughput (from zero; the in-process rate as a dashed line, given) and p50 / p95 latency against the number
    of clients, one line per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for protocol, replicas in sorted({(r.protocol, r.replicas) for r in results}):
        points = sorted(
            (r for r in results if (r.protocol, r.replicas) == (protocol, replicas)), key=lambda r: r.concurrency
        )
        clients = [r.concurrency for r in points]
        name = protocol if replicas == 1 else f"{protocol}, {replicas} replicas"
        left.plot(clients, [r.throughput for r in points], marker="o", label=name)
        right.plot(clients, [r.p50_s * 1e3 for r in points], marker="o", label=f"{name} p50")
        right.plot(clients, [r.p95_s * 1e3 for r in points], marker="x", linestyle="--", label=f"{name} p95")
    if baseline_s is not None:
        left.axhline(1 / baseline_s, color="gray", linestyle="--", label="in-process, one at a time")
    left.set_ylim(bottom=0)
    for axis, label in ((left, "generations / s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_results(results: Sequence[LoadResult], out: Path, meta: dict[str, Any], name: str = "load.json") -> Path:
    """Write ``meta`` and the points of a load run to ``out / name``; returns its path."""
    path = out / name
    path.write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=1))
    return path


def read_results(path: str | Path) -> tuple[list[LoadResult], dict[str, Any]]:
    """The points and the rest (``meta``) of a load run saved by :func:`save_results`."""
    data = json.loads(Path(path).read_text())
    fields = LoadResult.__dataclass_fields__
    results = [LoadResult(**{k: v for k, v in row.items() if k in fields}) for row in data.pop("results")]
    return results, data
