#!/usr/bin/env bash
# The one prepared GPU run (H100/H200, < 8 minutes): CUDA kernel tests, the attention benchmark and the
# end-to-end memory check. Results go under $OUT (the device tool's folder) or bench/results/.
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$OUT/gpu_env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu 2>&1 | tee "$OUT/gpu_tests.log"
timeout 200 python3 bench/attention.py --budget-s 170 --out "$OUT/attention_gpu.csv" 2>&1 | tail -n 40 | tee "$OUT/attention_gpu.log"
timeout 120 python3 bench/e2e_gpu.py --steps 3 2>&1 | tee "$OUT/e2e_gpu.log"
echo "gpu_check done"
