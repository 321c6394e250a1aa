"""The pipeline model of an exported Triton repository (copied there as ``<name>/1/model.py``; Python backend).

Loads: checks every file of the repository against ``repository_manifest.json`` (a corrupt or tampered file
fails the load, naming the file), reads ``step_table.json`` and ``initial_state.npy``.
Serves: one generation per request with :func:`step_logic.denoise`, each transformer call a BLS request to the
step's engine model. State (``li``, the fusion cache) is local to the request. Errors go back as the request's
error: a bad value ``INVALID_ARG``, a client that went away ``CANCELLED``, a failed engine ``INTERNAL``; the
instance keeps serving.

Tensors cross the stub through DLPack (``dlpack_io.py``: ``as_numpy()`` reads zeros with numpy 2 in the stub of
tritonserver 2.51).
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from dlpack_io import to_numpy, to_triton  # noqa: E402  (the model's own folder first)
from step_logic import (  # noqa: E402
    INITIAL_STATE,
    Cancelled,
    RequestError,
    StepTable,
    denoise,
    verify_files,
)


class EngineError(RuntimeError):
    """An engine model returned an error."""


class TritonPythonModel:
    def initialize(self, args):
        here = Path(__file__).parent
        model_dir = Path(args["model_repository"])
        checked = verify_files(model_dir.parent, here / "repository_manifest.json")
        self.table = StepTable.load(here)
        self.initial_state = np.load(here / INITIAL_STATE)
        self.name = json.loads(args["model_config"])["name"]
        pb_utils.Logger.log_info(
            f"{self.name}: {checked} repository files verified; steps 1..{self.table.max_steps}, "
            f"engine model {self.table.engine_model!r} with engines {list(self.table.engines)}"
        )

    def _run_engine(self, engine: str, feeds: dict) -> tuple:
        inputs = [to_triton(pb_utils.Tensor, name, value) for name, value in feeds.items()]
        request = pb_utils.InferenceRequest(
            model_name=engine,
            inputs=inputs,
            requested_output_names=list(self.table.outputs),
        )
        response = request.exec()
        if response.has_error():
            raise EngineError(f"engine model {engine!r} failed: {response.error().message()}")
        return tuple(to_numpy(pb_utils.get_output_tensor_by_name(response, name)) for name in self.table.outputs)

    def _scalar(self, request, name: str, kind):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else kind(to_numpy(tensor).reshape(-1)[0])

    def _generate(self, request) -> np.ndarray:
        given = {}
        for name in ("latents", *self.table.inputs):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:  # Triton 2.51 lets a required input through when the model has optional ones
                shapes = {"latents": self.table.latent_shape, **self.table.inputs}
                wanted = ", ".join(f"{n} {list(shape)}" for n, shape in shapes.items())
                raise RequestError(f"input {name!r} is missing: send {wanted}")
            given[name] = to_numpy(tensor)
        is_cancelled = getattr(request, "is_cancelled", lambda: False)
        return denoise(
            self.table,
            self.initial_state,
            given,
            self._run_engine,
            num_steps=self._scalar(request, "num_inference_steps", int),
            guidance_scale=self._scalar(request, "guidance_scale", float),
            guidance=self._scalar(request, "guidance", float),
            cancelled=is_cancelled,
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                latents = self._generate(request)
                responses.append(pb_utils.InferenceResponse([to_triton(pb_utils.Tensor, "denoised", latents)]))
            except RequestError as err:
                error = pb_utils.TritonError(f"{self.name}: {err}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Cancelled as err:
                pb_utils.Logger.log_warn(f"{self.name}: {err}")
                error = pb_utils.TritonError(f"{self.name}: {err}", pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as err:  # an engine failure: this request fails, the instance keeps serving
                pb_utils.Logger.log_error(f"{self.name}: {type(err).__name__}: {err}")
                error = pb_utils.TritonError(f"{self.name}: {type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
