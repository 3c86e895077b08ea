#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, with .gpu/ carried (see prepare.sh): explanations per second
# for the 10,000 CIFAR-10 test images and resnet50 at 224x224 (benchmarks/throughput.py), then the CUDA speed table
# (benchmarks/speed.py: SinglePass and the default engines against the plain gradient, Zennit and Captum). Both
# write their tables after each configuration, so a run cut short by its timeout keeps what it measured. Tables and
# logs go to $OUT (set by the device tool; copy them to benchmarks/results/ afterwards). Under 10 minutes in all.
# DEVICES=cpu QUICK=1 OUT=/tmp/out tries the script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for the tables and logs}"
DEVICES=${DEVICES:-cuda}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/bnfuse-data "$OUT" && tar -xJf .gpu/cifar10-test.tar.xz -C /tmp/bnfuse-data || exit 1
python3 -c 'import torch, zennit, captum; print("torch", torch.__version__, "GPU:", torch.cuda.is_available() and torch.cuda.get_device_name())'
if [ -n "${QUICK:-}" ]; then
    THROUGHPUT=(--images 64 --batch 32 --cifar10-models cifar10-vgg-bn --resnet50-images 2 --resnet50-batch 1)
    SPEED=(--models resnet18 --batches 1 --extra '' --repeats 1 --input-size 64 --memory none)
else
    THROUGHPUT=()
    SPEED=()
fi
timeout 180 python3 benchmarks/throughput.py --devices "$DEVICES" --data-root /tmp/bnfuse-data --out "$OUT" \
    "${THROUGHPUT[@]}" > "$OUT/throughput-$DEVICES.log" 2>&1
echo "throughput.py: exit $?"
timeout 330 python3 benchmarks/speed.py --devices "$DEVICES" --tag "speed-$DEVICES" --out "$OUT" "${SPEED[@]}" \
    > "$OUT/speed-$DEVICES.log" 2>&1
echo "speed.py: exit $?"
cat "$OUT/throughput-$DEVICES.md" 2>/dev/null
