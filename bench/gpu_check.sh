#!/usr/bin/env bash
# The one prepared GPU run (H100/H200, PyTorch 2.11 + Triton 3.6, no network): <= 8 minutes, the figures the
# targets need first. Every step has its own time limit and leaves what it measured under $OUT (the device
# tool's folder) or bench/results/; a step that times out does not stop the next one.
#   bash bench/gpu_check.sh
#   1. environment (GPU name / SKU, driver, versions)                                     ~5 s
#   2. warm Triton's cache: every kernel compiled for this GPU in 16 processes          <= 75 s
#      (python -m kernels.aot: same specialisation as the JIT, so the launches below hit the cache)
#   3. bench/attention.py: N = 12,288 and 4,096 self-attention fp16 first, rows written as measured  <= 210 s
#   4. the CUDA kernel tests (pytest -m cuda: only the real-GPU tests, every layout)    <= 110 s
#   5. bench/e2e_gpu.py: peak memory of a 2-concept 1024×768 composition                <= 60 s
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
T0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

step env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
} | tee "$OUT/gpu_env.txt"

step "warm the Triton cache"
timeout 75 python3 -m kernels.aot --arch 90 --jobs 16 --out "$OUT/triton_aot_sm90_gpu_machine.csv" 2>&1 | tail -n 5

step "attention benchmark"
timeout 210 python3 bench/attention.py --budget-s 180 --out "$OUT/attention_gpu.csv" 2>&1 | tail -n 60 \
    | tee "$OUT/attention_gpu.log"

step "CUDA kernel tests"
timeout 110 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py 2>&1 | tail -n 30 \
    | tee "$OUT/gpu_tests.log"

step "end-to-end memory"
timeout 60 python3 bench/e2e_gpu.py --steps 3 2>&1 | tail -n 20 | tee "$OUT/e2e_gpu.log"

step "gpu_check done"
ls -l "$OUT"
