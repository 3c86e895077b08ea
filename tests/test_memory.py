import os
import subprocess
import sys

import pytest

from zennit_bnfuse import memory

needs_glibc = pytest.mark.skipif(memory.glibc() is None, reason='glibc\'s malloc only')

# a 64 MiB tensor made and freed again and again: the page faults of the last three of six (on a kept heap the first
# ones settle it: PyTorch's alignment can leave the first freed block a little short for the next)
FAULTS_PER_TENSOR = '''
import resource, sys, torch
from zennit_bnfuse import memory
if sys.argv[1] == 'keep':
    memory.keep_freed_memory()
faults = []
for _ in range(6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(*faults[-3:])
'''


def faults_per_tensor(setting):
    # without allocator settings from the environment (even an empty MALLOC_MMAP_THRESHOLD_ changes what glibc does)
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith('MALLOC_') and name not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
    result = subprocess.run([sys.executable, '-c', FAULTS_PER_TENSOR, setting], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(faults) for faults in result.stdout.split()[-3:]]


@needs_glibc
def test_kept_memory_is_not_faulted_in_again():
    # glibc's defaults map the 64 MiB block for each tensor, 16384 pages of 4 KiB faulted in each time; kept on the
    # heap, the block of the tensor before is reused
    assert min(faults_per_tensor('defaults')) > 10_000
    assert max(faults_per_tensor('keep')) < 100


@pytest.mark.parametrize('limit', [0, 2 ** 20 - 1, 2 ** 31, -1, 1.5e9, True, '1G'])
def test_limit_out_of_range(limit):
    with pytest.raises(ValueError, match='limit must be an int of bytes'):
        memory.keep_freed_memory(limit)


def test_refused_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, 'glibc', lambda: None)
    with pytest.raises(RuntimeError, match='sets glibc\'s malloc.*allocator\'s own settings'):
        memory.keep_freed_memory()


@needs_glibc
def test_refused_in_front_of_another_allocator(monkeypatch):
    monkeypatch.setattr(memory, 'malloc_is_glibcs', lambda libc: False)
    monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libtcmalloc_minimal.so.4')
    with pytest.raises(RuntimeError, match=r'not glibc\'s \(LD_PRELOAD=/usr/lib/libtcmalloc_minimal.so.4\)'):
        memory.keep_freed_memory()


@needs_glibc
def test_malloc_is_glibcs_sees_a_preloaded_allocator():
    # this process's malloc is glibc's; under LD_PRELOAD of another allocator (where one is installed) it is not
    assert memory.malloc_is_glibcs(memory.glibc())
    library = next((path for path in ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                                      '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2') if os.path.exists(path)), None)
    if library is None:
        pytest.skip('no jemalloc or tcmalloc installed')
    result = subprocess.run(
        [sys.executable, '-c', 'from zennit_bnfuse import memory; print(memory.malloc_is_glibcs(memory.glibc()))'],
        capture_output=True, text=True, env={**os.environ, 'LD_PRELOAD': library}, timeout=60)
    assert result.stdout.split()[-1] == 'False', result.stderr


@needs_glibc
def test_glibc_refusal_is_reported(monkeypatch):
    class Refusing:
        def __init__(self, libc):
            self.malloc = libc.malloc

        @staticmethod
        def mallopt(parameter, value):
            return 0
    libc = memory.glibc()
    monkeypatch.setattr(memory, 'glibc', lambda: Refusing(libc))
    with pytest.raises(RuntimeError, match=r'refused mallopt\(M_MMAP_THRESHOLD, 1073741824\)'):
        memory.keep_freed_memory()
