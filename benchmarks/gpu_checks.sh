#!/usr/bin/env bash
# Every check of issue 4 that needs a CUDA GPU, as one prepared script for the `device` machine:
#   run(command="bash benchmarks/gpu_checks.sh", timeout_s=540)
# It installs the package (CUDA torch from the device's index when present), runs the GPU tests,
# then the verify benchmark (GPU part only; the CPU part is measured on the dev machine), and
# leaves the logs and the RESULTS.md it wrote under $OUT (or benchmarks/gpu-out locally).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu-out}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[test]' > "$out/pip.log" 2>&1
.venv-gpu/bin/python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  | tee "$out/torch.txt"
HF_HUB_OFFLINE=1 .venv-gpu/bin/python -m pytest -q -m gpu tests/test_verify.py 2>&1 | tee "$out/pytest-gpu.log"
.venv-gpu/bin/python benchmarks/bench_verify.py --no-cpu 2>&1 | tee "$out/bench-verify.log"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
