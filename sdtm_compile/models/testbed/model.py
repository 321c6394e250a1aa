"""The trained testbed model: an ``SD3Transformer2DModel`` in pixel space plus its label "text encoder".

:func:`load_testbed` builds the real diffusers class from a testbed spec (:data:`TESTBEDS`: ``testbed-1024``, 4
blocks; ``testbed12-1024``, 12 blocks) and loads the weights that ship in this package
(``weights/<name>.safetensors``, checked against the sha256 in ``weights/<name>.json``).
:class:`LabelPrompt` turns the six labels of :mod:`~sdtm_compile.models.testbed.data` into what SD3's text encoders
would give: prompt embeddings ``[B, 6, 64]`` and a pooled embedding ``[B, 64]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ...engines import sha256_file
from ..specs import TESTBED, TESTBED12, TinySpec, tiny_sd3_transformer
from .data import LABEL_SLOTS

__all__ = [
    "LabelPrompt",
    "TestbedModel",
    "TESTBEDS",
    "testbed_spec",
    "weights_file",
    "new_testbed",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "load_testbed",
    "save_testbed",
    "TestbedWeightsError",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The trained testbeds by name (the spec's ``weights``): what ``TrainConfig.model`` and :func:`load_testbed` accept.
TESTBEDS: dict[str, TinySpec] = {spec.weights: spec for spec in (TESTBED, TESTBED12)}  # type: ignore[misc]


def testbed_spec(name: str) -> TinySpec:
    """The spec of the testbed ``name`` (a key of :data:`TESTBEDS`); a clear error for any other name."""
    if name not in TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}: expected one of {sorted(TESTBEDS)}")
    return TESTBEDS[name]


def weights_file(name: str) -> Path:
    """Where the package keeps the weights of testbed ``name`` (its manifest: the same path with ``.json``)."""
    testbed_spec(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


WEIGHTS_FILE = weights_file("testbed-1024")
MANIFEST_FILE = WEIGHTS_FILE.with_suffix(".json")


class TestbedWeightsError(RuntimeError):
    """The testbed's weights file or manifest is missing, corrupt or does not fit the model."""


class LabelPrompt(nn.Module):
    """Labels ``[B, S]`` (one word index per slot, 0 = null) -> prompt ``[B, S, D]``, pooled ``[B, D]``.

    One learned vector per (slot, word) plus a learned vector per slot position; pooled is the mean over slots
    of the word vectors. A prompt of all nulls is the unconditional prompt of classifier-free guidance.
    """

    def __init__(self, dim: int = TESTBED.joint_attention_dim) -> None:
        super().__init__()
        sizes = [len(words) + 1 for words in LABEL_SLOTS.values()]
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]]).cumsum(0), persistent=False)
        self.words = nn.Embedding(sum(sizes), dim)
        self.slots = nn.Parameter(torch.zeros(len(sizes), dim))
        nn.init.normal_(self.words.weight, std=1.0)
        nn.init.normal_(self.slots, std=0.1)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.words(labels + self.offsets)
        return words + self.slots, words.mean(dim=1)


class TestbedModel(nn.Module):
    """The transformer and the label prompt, trained together (one state dict: ``transformer.*``, ``prompt.*``)."""

    def __init__(self, transformer: nn.Module, prompt: LabelPrompt) -> None:
        super().__init__()
        self.transformer = transformer
        self.prompt = prompt

    def forward(self, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``eps - x0`` predicted at ``x`` ``[B, 3, 64, 64]``, noise level ``sigma`` [B]."""
        prompt, pooled = self.prompt(labels)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]


def new_testbed(seed: int = 0, spec: TinySpec = TESTBED) -> TestbedModel:
    """The testbed architecture ``spec`` with seeded random weights (the "random init" every learned number is set
    against)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        prompt = LabelPrompt(spec.joint_attention_dim)
    return TestbedModel(tiny_sd3_transformer(spec, seed=seed).train(), prompt)


#: Weights of at least this many elements are stored as int8 rows when ``storage="int8"``.
INT8_MIN_ELEMENTS = 4096


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` -> int8 ``[R, C]`` and a float32 scale per row ``[R]`` (symmetric: ``weight ~ q * scale``)."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale.float()


def _stored_state(model: nn.Module, storage: str) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().float()
        if storage == "int8" and value.dim() == 2 and value.numel() >= INT8_MIN_ELEMENTS:
            state[name], state[name + SCALE_SUFFIX] = _quantize_rows(value)
        else:
            state[name] = value.to(torch.float16)
    return {k: v.contiguous() for k, v in state.items()}


#: The key suffix of an int8 weight's per-row scales in a stored state.
SCALE_SUFFIX = "#row_scale"


def _loaded_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`_stored_state`: int8 rows times their scale, everything in float32."""
    state = {}
    for name, value in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if value.dtype == torch.int8:
            value = value.float() * stored[name + SCALE_SUFFIX].float()[:, None]
        state[name] = value.float()
    return state


def save_testbed(
    model: TestbedModel, path: Path, manifest: dict, name: str = "testbed-1024", storage: str = "float16"
) -> dict:
    """Write ``model`` (testbed ``name``) as safetensors at ``path`` and its manifest (plus sha256, size, spec) at
    ``path`` with ``.json``.

    ``storage``: ``"float16"``, or ``"int8"``: every 2-D weight of at least :data:`INT8_MIN_ELEMENTS` elements as
    int8 rows with a float32 scale per row, the rest float16 (the 12-block testbed, to keep its file under 25 MB).
    The stored weights *are* the model: every measurement loads them back.
    """
    from safetensors.torch import save_file

    if storage not in ("float16", "int8"):
        raise ValueError(f"storage={storage!r}: expected 'float16' or 'int8'")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_stored_state(model, storage), str(path), metadata={"format": "pt"})
    manifest = {
        "model": name,
        "weights": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "dtype": "float16" if storage == "float16" else "int8 rows (2-D weights), float16 (the rest)",
        "spec": asdict(testbed_spec(name)),
        "label_slots": {k: list(v) for k, v in LABEL_SLOTS.items()},
        **manifest,
    }
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_testbed(
    path: Path | str | None = None,
    manifest_path: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "testbed-1024",
) -> TestbedModel:
    """The trained testbed ``name`` (a key of :data:`TESTBEDS`), in eval mode. Needs no network.

    ``path``: its weights (default: the package's, :func:`weights_file`); ``manifest_path``: default ``path`` with
    ``.json``. Raises :class:`TestbedWeightsError` naming the file when the weights or the manifest are missing, when
    the weights' sha256 differs from the manifest's (a corrupt or replaced file), or when they do not fit the model.
    """
    spec = testbed_spec(name)
    path = Path(path) if path is not None else weights_file(name)
    manifest_path = Path(manifest_path) if manifest_path is not None else path.with_suffix(".json")
    retrain = (
        f"retrain with `sdtm-compile train-testbed --model {name}` or restore it from the repository (git checkout)"
    )
    for required in (path, manifest_path):
        if not required.is_file():
            raise TestbedWeightsError(f"testbed file {required} is missing: {retrain}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["sha256"]
    except (ValueError, KeyError) as error:
        raise TestbedWeightsError(f"testbed manifest {manifest_path} is not valid ({error}): {retrain}") from error
    actual = sha256_file(path)
    if actual != expected:
        raise TestbedWeightsError(
            f"testbed weights {path} are corrupt or replaced: sha256 {actual[:16]}... but {manifest_path} "
            f"expects {expected[:16]}...; {retrain}"
        )
    from safetensors.torch import load_file

    model = new_testbed(spec=spec)
    try:
        model.load_state_dict(_loaded_state(load_file(str(path))))
    except Exception as error:  # a file with the right hash but another architecture: a stale manifest
        raise TestbedWeightsError(f"testbed weights {path} do not fit the testbed model {name}: {error}") from error
    return model.to(dtype).eval()
