#!/usr/bin/env bash
# CompositeLRP against its floor under each memory allocator setting, one run after another (each a new process, as
# an allocator is chosen when a process starts): glibc's malloc with its defaults; PyTorch asking for transparent huge
# pages (THP_MEM_ALLOC_ENABLE=1); glibc told to keep freed memory (and, for comparison, the weaker setting
# the docs gave before); jemalloc and tcmalloc through LD_PRELOAD where
# they are installed (Debian/Ubuntu: apt install libjemalloc2 libtcmalloc-minimal4). Each run writes
# benchmarks/results/speed-interleaved-allocators-<name>.md/.json with the command (settings included), machine and
# date; the ratios within a run are the ones to compare. Exits 1, naming them, when any run failed (the others still
# run).
#
#     bash benchmarks/allocators.sh                       # resnet50 at batch 16, 5 repeats
#     MODELS=resnet50 BATCHES=1,16 REPEATS=3 PYTHON=.venv/bin/python bash benchmarks/allocators.sh
#     (also INPUT_SIZE, and OUT for another folder than benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LIBRARIES=${LIBRARIES:-/usr/lib/x86_64-linux-gnu}
ARGUMENTS=(--methods floor,composite --models "${MODELS:-resnet50}" --batches "${BATCHES:-16}"
           --repeats "${REPEATS:-5}" --input-size "${INPUT_SIZE:-224}" ${OUT:+--out "$OUT"})

FAILED=()
EXTRA=()  # more arguments for the next run

run() {  # name, then environment settings (NAME=value ...)
    local name=$1
    shift
    echo "== $name: $* ${EXTRA[*]}"
    if env "$@" "$PYTHON" -c '' 2>&1 | grep -q 'cannot be preloaded'; then  # ld.so only warns, and runs on glibc
        echo "== $name: $* cannot be preloaded, not run"
        FAILED+=("$name")
        return
    fi
    # print the target rows (none for a model without a target)
    env "$@" "$PYTHON" benchmarks/speed_interleaved.py "${ARGUMENTS[@]}" "${EXTRA[@]}" \
        --tag "speed-interleaved-allocators-$name" | grep -F '| ≤ '
    [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("$name")
}

run default
run thp THP_MEM_ALLOC_ENABLE=1
# glibc keeping freed memory: blocks up to 1 GiB from its heap rather than mapped for each (above the threshold a
# block is mapped and unmapped every time), and up to 1 GiB of free heap kept rather than handed back
run glibc-keep MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
# what the docs advised before: a 32 MiB threshold still maps every block of 32 MiB or more (resnet50's 49 MiB
# feature maps at batch 16)
run glibc-keep-below-32mib MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736
# the same as glibc-keep, set from inside the process by zennit_bnfuse.keep_freed_memory() (as in a notebook)
EXTRA=(--keep-freed-memory)
run keep-freed-memory
EXTRA=()
for library in jemalloc:libjemalloc.so.2 tcmalloc:libtcmalloc_minimal.so.4; do
    if [ -e "$LIBRARIES/${library#*:}" ]; then
        run "${library%%:*}" LD_PRELOAD="$LIBRARIES/${library#*:}"
    else
        echo "== ${library%%:*}: $LIBRARIES/${library#*:} not installed, left out"
    fi
done
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
