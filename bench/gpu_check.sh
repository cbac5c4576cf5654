#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA and a Python that has torch (no network):
#   bash bench/gpu_check.sh [WHEELS_DIR]     # logs go to $OUT (default: ./gpu-logs)
# 1. pytest -m gpu (bf16 over fp32 master weights, QLoRA, packed rows under SDPA/FlashAttention);
# 2. bench/gpu_mfu.py (model FLOPs utilisation of the training loop);
# 3. bench/finetune_135m_vs_trl.py --device cuda (SmolLM2-135M shape vs TRL SFTTrainer);
# 4. the server's constrained decoding and tool calls with the model on CUDA (llguidance masks
#    applied on the logits' device), GRPO's sampling + loss on CUDA;
# 5. bench/dpo_vs_trl.py --device cuda (one DPO epoch vs TRL's DPOTrainer).
# STEPS (default "1 2 3 4 5") picks which to run.
# Wheels for packages the machine lacks (pydantic, datasets, trl, ...) are installed from WHEELS_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
if [ -n "${1:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
# USE_HUB_KERNELS=NO: specialize loads without Hub kernels; TRL (transformers defaults) would fetch them
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 USE_HUB_KERNELS=NO PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-1 2 3 4 5}
for step in $STEPS; do case $step in
  1) timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" ;;
  2) timeout 90 python3 bench/gpu_mfu.py 2>&1 | tee "$OUT/gpu_mfu.log" ;;
  3) timeout 200 python3 bench/finetune_135m_vs_trl.py --device cuda 2>&1 | tee "$OUT/bench_135m_cuda.log" ;;
  4) timeout 150 python3 -m pytest tests/test_serve_structured.py tests/test_serve_tools.py tests/test_grpo.py \
       -p no:cacheprovider -q -x 2>&1 | tee "$OUT/gpu_serve_grpo.log" ;;
  5) timeout 300 python3 bench/dpo_vs_trl.py --device cuda 2>&1 | tee "$OUT/bench_dpo_cuda.log" ;;
esac; done
