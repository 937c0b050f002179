#!/usr/bin/env bash
# Every check of issue 4 that needs a CUDA GPU, as one prepared script for the `device` machine:
#   run(command="bash benchmarks/gpu_checks.sh", timeout_s=540)
# That machine cannot fetch packages; its python3 already holds torch (CUDA), numpy, safetensors,
# click, pytest and hypothesis, so the package runs from the checkout (PYTHONPATH) without an
# install (step timeouts sum to 520 s). It runs the GPU tests, then the verify and pack benchmarks' GPU parts (the CPU parts are
# measured on the dev machine), and leaves the logs and the RESULTS.md it wrote under $OUT (or
# benchmarks/gpu-out when run elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  2>&1 | tee "$out/torch.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_verify.py tests/test_pack.py 2>&1 \
  | tee "$out/pytest-gpu.log"
timeout 190 python3 benchmarks/bench_verify.py --no-cpu 2>&1 | tee "$out/bench-verify.log"
# pack (issue 13, item 6): the GPU rows only, in RESULTS.md's section pack-gpu (the CPU rows: dev machine)
timeout 90 python3 benchmarks/bench_pack.py --no-cpu 2>&1 | tee "$out/bench-pack.log"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
