#!/usr/bin/env bash
# Run here (with internet or a package registry), from the repository root: puts in .gpu/ what
# benchmarks/gpu/run.sh needs on a lent GPU machine that has PyTorch but no registry and no ../shared:
# the wheels of Zennit and Captum (pure Python) and the CIFAR-10 test split, packed (about 4 MB).
# .gpu/ is ignored by git (.git/info/exclude); name it in the device tool's carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
EXCLUDE=$(git rev-parse --git-path info/exclude)  # also in a worktree, where .git is a file
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >> "$EXCLUDE"
mkdir -p .gpu
python -m pip download -q --no-deps --only-binary=:all: -d .gpu zennit==0.5.1 captum==0.9.0
DATA=${DATA:-../shared/data}
tar -cJf .gpu/cifar10-test.tar.xz -C "$DATA" CIFAR10-JPEG/test
du -sh .gpu
