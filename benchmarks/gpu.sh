#!/usr/bin/env bash
# Issue 14's GPU figures, every one into OUT (docs/guides/gpu.md). On one H100 or H200:
#   bash benchmarks/gpu.sh MNIST_DIR OUT            # all of it, about 4 minutes
#   bash benchmarks/gpu.sh MNIST_DIR OUT timed      # the timed part alone: run it on an otherwise idle GPU
#   bash benchmarks/gpu.sh MNIST_DIR OUT checks     # resume on CUDA (no timings)
# timed: configs/mnist-gpu.yaml trains CLIP, prior and decoder from nothing (benchmarks/train_pipeline.py, each
# command timed from process start, then judged on the GPU); the shipped mnist pipeline's images per second at
# batch 1,024 as shipped, under bf16 autocast and through torch.compile, and `t2i generate -n 1024` from process
# start (benchmarks/generation_throughput.py); one training step of the decoder and the prior per variant
# (benchmarks/throughput.py --kernels-only; torch.compile, minutes to compile, is measured on generation only).
# checks: a run stopped by SIGTERM and resumed on CUDA against uninterrupted ones (benchmarks/resume.py).
set -u
data=${1:?usage: bash benchmarks/gpu.sh MNIST_DIR OUT [all|timed|checks]}
out=${2:?usage: bash benchmarks/gpu.sh MNIST_DIR OUT [all|timed|checks]}
part=${3:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; }
status=0
if [ "$part" != checks ]; then
    step machine
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/machine.txt"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/machine.txt"
    step "from scratch: configs/mnist-gpu.yaml"
    python3 benchmarks/train_pipeline.py --config configs/mnist-gpu.yaml --data-dir "$data" --device cuda \
        --run runs/mnist-gpu --out "$out" || status=1
    step "generation throughput"
    python3 benchmarks/generation_throughput.py --checkpoints checkpoints/mnist --device cuda --batch 1024 \
        --variants fp32,bf16,compile --end-to-end --out "$out/generation-throughput" || status=1
    step "one training step per variant"
    python3 benchmarks/throughput.py --config configs/mnist-gpu.yaml --device cuda --kernels-only --no-compile \
        --out "$out/throughput-kernels" || status=1
fi
if [ "$part" != timed ]; then
    step "resume on CUDA"
    python3 benchmarks/resume.py --data-dir "$data" --device cuda --out "$out/resume" || status=1
fi
step done
exit $status
