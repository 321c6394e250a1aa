#!/usr/bin/env bash
# The GPU check: run it from a checkout of this repository on a machine with one NVIDIA GPU.
#
#   bash scripts/gpu_check.sh                  # sd3-medium, 1024x1024, 28 steps, float16, every variant
#   bash scripts/gpu_check.sh --runs 5 --json my_gpu.json   # any option of `sdtm-compile doctor --gpu`
#
# It installs this package with its dev and trt extras (torch-tensorrt matching torch), runs the TensorRT tests,
# builds every variant (eager, torch.compile, torch-tensorrt alone, sdtm, sdtm_trt) of sd3-medium and prints one
# table (first call, s/generation, speed-up over plain torch.compile, peak GPU memory, max difference to eager).
# The report is also saved as JSON (default gpu_check.json; --json PATH to change). See docs/gpu.md.
#
# Not run by the authors: no GPU was available to them. Without a GPU, check the CPU parts with
#   sdtm-compile doctor --gpu --dry-run
set -euo pipefail

PYTHON="${PYTHON:-python}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail() {
    echo "gpu_check.sh: $1" >&2
    echo "  This check needs one NVIDIA GPU with a working driver and a CUDA build of torch." >&2
    echo "  Without a GPU, check the CPU parts instead:  sdtm-compile doctor --gpu --dry-run" >&2
    exit 2
}

# 1. the GPU and its driver
command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi found but failed: the NVIDIA driver does not work ($(nvidia-smi -L 2>&1 | head -n 1))"
echo "gpu_check.sh: $(nvidia-smi -L | head -n 1)"

# 2. torch, if installed, must be a CUDA build that sees the GPU (checked before pip touches anything)
torch_version=""
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || fail "torch ${torch_version} cannot use CUDA (torch.version.cuda = $("$PYTHON" -c 'import torch; print(torch.version.cuda)')); install a CUDA build of torch: https://pytorch.org/get-started/locally/"
fi

# 3. this package and its extras. The trt extra pins torch-tensorrt 2.13.x, which needs torch 2.13: with another
#    torch, install without it and let `doctor --install` pick the torch-tensorrt that matches the installed torch.
extras="dev,trt"
case "$torch_version" in
    "" | 2.13.*) ;;
    *)
        echo "gpu_check.sh: torch ${torch_version} is not 2.13: installing without the trt extra (pinned to 2.13);" \
            "doctor --install installs the torch-tensorrt that matches torch ${torch_version%%+*}" >&2
        extras="dev"
        ;;
esac
echo "gpu_check.sh: $PYTHON -m pip install -e \".[${extras}]\""
"$PYTHON" -m pip install -e ".[${extras}]"
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "after installing, torch $("$PYTHON" -c 'import torch; print(torch.__version__)') cannot use CUDA"

# 4. the check: environment, torch-tensorrt (installed if missing or mismatched), the TensorRT tests, the table
start=$SECONDS
status=0
"$PYTHON" -m sdtm_compile doctor --gpu --install --tests --json gpu_check.json "$@" || status=$?
echo "gpu_check.sh: finished in $((SECONDS - start)) s with exit status ${status} (0: every step passed)" >&2
exit "$status"
