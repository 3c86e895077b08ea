import os
import subprocess
import sys

import numpy
import pytest

from zennit_bnfuse import memory

needs_glibc = pytest.mark.skipif(memory._glibc() is None, reason='glibc\'s malloc only')

# allocators another process may be started in front of glibc's, where they are installed
PRELOADABLE = [path for path in ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                                 '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
                                 '/usr/lib/x86_64-linux-gnu/libmemusage.so') if os.path.exists(path)]

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


def environment_without_allocator_settings():
    '''This process's environment without what changes the allocator (even an empty MALLOC_MMAP_THRESHOLD_ changes
    what glibc does; PyTorch's THP_MEM_ALLOC_ENABLE asks for huge pages, 512 times fewer faults).'''
    return {name: value for name, value in os.environ.items()
            if not name.startswith('MALLOC_') and name not in ('GLIBC_TUNABLES', 'LD_PRELOAD', 'THP_MEM_ALLOC_ENABLE')}


def transparent_huge_pages_always():
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as file:
            return '[always]' in file.read()
    except OSError:
        return False


def faults_per_tensor(setting):
    result = subprocess.run([sys.executable, '-c', FAULTS_PER_TENSOR, setting], capture_output=True, text=True,
                            env=environment_without_allocator_settings(), timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(faults) for faults in result.stdout.split()[-3:]]


@needs_glibc
@pytest.mark.skipif(transparent_huge_pages_always(), reason='the kernel backs the blocks with huge pages')
def test_kept_memory_is_not_faulted_in_again():
    # glibc's defaults map the 64 MiB block for each tensor, 16384 pages of 4 KiB faulted in each time; kept on the
    # heap, the block of the tensor before is reused
    assert min(faults_per_tensor('defaults')) > 10_000
    assert max(faults_per_tensor('keep')) < 100


@pytest.mark.parametrize('limit', [0, 2 ** 26 - 1, 2 ** 25, 2 ** 31, -1, 1.5e9, True, '1G', None])
def test_limit_out_of_range(limit):
    with pytest.raises(ValueError, match=r'limit must be an int of bytes from 64 MiB \(67108864\) to 2147483647'):
        memory.keep_freed_memory(limit)


@pytest.mark.parametrize('limit', [2 ** 26, numpy.int64(2 ** 30), 2 ** 31 - 1])
def test_limit_in_range(limit):
    # integers of any kind (numpy's too) within the range; mallopt itself is not called here
    assert memory._as_limit(limit) == int(limit)


def test_refused_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, '_glibc', lambda: None)
    with pytest.raises(RuntimeError, match='sets glibc\'s malloc.*allocator\'s own settings'):
        memory.keep_freed_memory()


@needs_glibc
def test_refused_in_front_of_another_allocator(monkeypatch):
    monkeypatch.setattr(memory, '_malloc_is_glibcs', lambda libc: False)
    monkeypatch.setenv('LD_PRELOAD', '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4')
    with pytest.raises(RuntimeError, match=r'another malloc is in front of glibc\'s in this process '
                                           r'\(LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\): '
                                           r'its settings apply, not glibc\'s'):
        memory.keep_freed_memory()


@needs_glibc
def test_this_process_calls_glibcs_malloc():
    assert memory._malloc_is_glibcs(memory._glibc())


@needs_glibc
@pytest.mark.skipif(not PRELOADABLE, reason='no jemalloc, tcmalloc or libmemusage installed')
@pytest.mark.parametrize('library', PRELOADABLE or [None])
def test_refused_in_a_process_started_with_another_allocator(library):
    # the real detection, in a process with that library preloaded: keep_freed_memory refuses and names it
    call = ('from zennit_bnfuse import memory\n'
            'try:\n    memory.keep_freed_memory()\nexcept RuntimeError as error:\n    print(error)\n')
    result = subprocess.run([sys.executable, '-c', call], capture_output=True, text=True, timeout=60,
                            env={**environment_without_allocator_settings(), 'LD_PRELOAD': library})
    assert result.returncode == 0, result.stderr
    assert f'another malloc is in front of glibc\'s in this process (LD_PRELOAD={library})' in result.stdout


class Refusing:
    '''glibc's C library, but its mallopt refuses the setting numbered ``refused``.'''
    def __init__(self, libc, refused):
        self.malloc = libc.malloc
        self.refused = refused

    def mallopt(self, parameter, value):
        return 0 if parameter == self.refused else 1


@needs_glibc
@pytest.mark.parametrize('refused, message', [
    (memory.M_MMAP_THRESHOLD, r'refused mallopt\(M_MMAP_THRESHOLD, 1073741824\): this glibc may cap'),
    (memory.M_TRIM_THRESHOLD, r'refused mallopt\(M_TRIM_THRESHOLD, 1073741824\); M_MMAP_THRESHOLD was set to '
                              r'1073741824 already'),
])
def test_glibc_refusal_is_reported(monkeypatch, refused, message):
    libc = memory._glibc()
    monkeypatch.setattr(memory, '_glibc', lambda: Refusing(libc, refused))
    with pytest.raises(RuntimeError, match=message):
        memory.keep_freed_memory()
