"""One engine of an exported Triton repository, run by the Python backend with the ``onnxruntime`` package
(copied there as ``<engine>/1/model.py`` when the repository is written with ``engine_backend="python"``).

The same ``model.onnx`` that Triton's ONNX Runtime backend would serve; this runner exists for servers that ship
only the Python backend (PyTriton's ``tritonserver``). CPU only. Tensors cross the stub through DLPack
(``dlpack_io.py``).
"""

import json
import sys
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from dlpack_io import to_numpy, to_triton  # noqa: E402  (the model's own folder first)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        # the weights once: no per-branch prepacked copies, no arena grown to every engine's activations
        # (sdtm_compile.deploy.runner.lean_session_options, which this file cannot import on the server)
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        path = Path(__file__).parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: to_numpy(pb_utils.get_input_tensor_by_name(request, name)) for name in self.inputs}
            try:
                results = self.session.run(self.outputs, feeds)
            except Exception as err:  # ONNX Runtime's own message names the input or node
                error = pb_utils.TritonError(f"{type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensors = [to_triton(pb_utils.Tensor, n, r) for n, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
