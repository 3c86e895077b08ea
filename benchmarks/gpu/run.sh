#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, with .gpu/ carried (see prepare.sh): the CUDA speed table
# (benchmarks/speed.py, SinglePass and the default engines included) and explanations per second for the
# 10,000 CIFAR-10 test images and resnet50 at 224x224 (benchmarks/throughput.py). Tables and logs go to $OUT
# (default: benchmarks/results). DEVICES=cpu QUICK=1 tries the script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
DEVICES=${DEVICES:-cuda}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/bnfuse-data "$OUT" && tar -xJf .gpu/cifar10-test.tar.xz -C /tmp/bnfuse-data || exit 1
python3 -c 'import torch, zennit, captum; print("torch", torch.__version__, "GPU:", torch.cuda.is_available() and torch.cuda.get_device_name())'
if [ -n "${QUICK:-}" ]; then
    SPEED=(--models resnet18 --batches 1 --extra '' --repeats 1 --input-size 64 --memory none)
    THROUGHPUT=(--images 64 --batch 32 --cifar10-models cifar10-vgg-bn --resnet50-images 2 --resnet50-batch 1)
else
    SPEED=()
    THROUGHPUT=()
fi
timeout 300 python3 benchmarks/speed.py --devices "$DEVICES" --tag "speed-$DEVICES" --out "$OUT" "${SPEED[@]}" \
    > "$OUT/speed-$DEVICES.log" 2>&1
echo "speed.py: exit $?"
timeout 240 python3 benchmarks/throughput.py --devices "$DEVICES" --data-root /tmp/bnfuse-data --out "$OUT" \
    "${THROUGHPUT[@]}" > "$OUT/throughput-$DEVICES.log" 2>&1
echo "throughput.py: exit $?"
cat "$OUT/throughput-$DEVICES.md" 2>/dev/null
