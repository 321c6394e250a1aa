"""The trained testbed model: an ``SD3Transformer2DModel`` in pixel space plus its label "text encoder".

:func:`load_testbed` builds the real diffusers class from :data:`TESTBED` and loads the weights that ship in
this package (``weights/testbed-1024.safetensors``, checked against the sha256 in ``weights/manifest.json``).
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
from ..specs import TESTBED, tiny_sd3_transformer
from .data import LABEL_SLOTS

__all__ = [
    "LabelPrompt",
    "TestbedModel",
    "new_testbed",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "load_testbed",
    "save_testbed",
    "TestbedWeightsError",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "testbed-1024.safetensors"
MANIFEST_FILE = WEIGHTS_DIR / "manifest.json"


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


def new_testbed(seed: int = 0) -> TestbedModel:
    """The testbed architecture with seeded random weights (the "random init" every learned number is set against)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        prompt = LabelPrompt()
    return TestbedModel(tiny_sd3_transformer(TESTBED, seed=seed).train(), prompt)


def save_testbed(model: TestbedModel, path: Path, manifest: dict) -> dict:
    """Write ``model`` as fp16 safetensors at ``path`` and ``manifest`` (plus sha256, size, spec) beside it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    manifest = {
        "weights": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "dtype": "float16",
        "spec": asdict(TESTBED),
        "label_slots": {k: list(v) for k, v in LABEL_SLOTS.items()},
        **manifest,
    }
    (path.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_testbed(
    path: Path | str = WEIGHTS_FILE, manifest_path: Path | str | None = None, dtype: torch.dtype = torch.float32
) -> TestbedModel:
    """The trained testbed, in eval mode. Needs no network.

    Raises :class:`TestbedWeightsError` naming the file when the weights or the manifest are missing, when the
    weights' sha256 differs from the manifest's (a corrupt or replaced file), or when they do not fit the model.
    """
    path = Path(path)
    manifest_path = Path(manifest_path) if manifest_path is not None else path.parent / "manifest.json"
    retrain = "retrain with `sdtm-compile train-testbed` or restore it from the repository (git checkout)"
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

    model = new_testbed()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as error:  # a file with the right hash but another architecture: a stale manifest
        raise TestbedWeightsError(f"testbed weights {path} do not fit the testbed model: {error}") from error
    return model.to(dtype).eval()
