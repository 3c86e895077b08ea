import ctypes.util
import os
import subprocess
import sys

import numpy
import pytest

from zennit_bnfuse import memory

needs_glibc = pytest.mark.skipif(memory._glibc() is None, reason='glibc\'s malloc only')

# allocators another process may be started with in front of glibc's, by soname, where they are installed
PRELOADABLE = [name for name in map(ctypes.util.find_library, ('tcmalloc_minimal', 'tcmalloc', 'jemalloc')) if name]

# a 64 MiB tensor made and freed twelve times: the page faults of each. On a kept heap the first few grow it: small
# blocks that stay (PyTorch's thread pool, started by the first fill, and what it allocates) can split a freed block so
# that the next tensor does not fit (seen: up to the fourth tensor faulted in); after that the heap holds a free block
# big enough and nothing is faulted in again
FAULTS_PER_TENSOR = '''
import resource, sys, torch
from zennit_bnfuse import memory
if sys.argv[1] == 'keep':
    memory.keep_freed_memory()
faults = []
for _ in range(12):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(*faults)
'''


def environment_without_allocator_settings():
    '''This process's environment without what changes the allocator (even an empty MALLOC_MMAP_THRESHOLD_ changes
    what glibc does; PyTorch's THP_MEM_ALLOC_ENABLE asks for huge pages, 512 times fewer faults).'''
    return {name: value for name, value in os.environ.items()
            if not name.startswith('MALLOC_') and name not in ('GLIBC_TUNABLES', 'LD_PRELOAD', 'THP_MEM_ALLOC_ENABLE')}


def run_python(code, *arguments, **environment):
    '''Run ``code`` in a new Python without allocator settings (plus ``environment``); its stdout.'''
    result = subprocess.run([sys.executable, '-c', code, *arguments], capture_output=True, text=True, timeout=120,
                            env={**environment_without_allocator_settings(), **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout


def transparent_huge_pages_always():
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as file:
            return '[always]' in file.read()
    except OSError:
        return False


def faults_per_tensor(setting):
    return [int(faults) for faults in run_python(FAULTS_PER_TENSOR, setting).split()]


@needs_glibc
@pytest.mark.skipif(transparent_huge_pages_always(), reason='the kernel backs the blocks with huge pages')
def test_kept_memory_is_not_faulted_in_again():
    # glibc's defaults map the 64 MiB block for each tensor, each of its pages faulted in each time (16384 of 4 KiB);
    # kept on the heap, a freed block is reused: none of the last six tensors is faulted in
    pages_per_tensor = 2 ** 26 // os.sysconf('SC_PAGE_SIZE')
    defaults, kept = faults_per_tensor('defaults'), faults_per_tensor('keep')
    assert len(defaults) == len(kept) == 12
    assert min(defaults) > pages_per_tensor // 2
    assert sum(kept[6:]) < 100, kept


@pytest.mark.parametrize('limit, why', [
    (0, 'a smaller fixed threshold'),
    (2 ** 25 - 1, 'a smaller fixed threshold'),
    (-1, 'a smaller fixed threshold'),
    (2 ** 31, 'mallopt takes a C int'),
    (1.5e9, 'an int of bytes'),
    (True, 'an int of bytes'),
    ('1G', 'an int of bytes'),
    (None, 'an int of bytes'),
])
def test_limit_out_of_range(limit, why):
    with pytest.raises(ValueError, match=rf'limit must be an int of bytes from 32 MiB \(33554432\) to 2147483647, '
                                         rf'got .*\({why}'):
        memory.keep_freed_memory(limit)


class FakeC:
    '''glibc's C library, but its mallopt records its calls and refuses the setting numbered ``refused``.'''
    def __init__(self, libc, refused=None):
        self.malloc = libc.malloc
        self.refused = refused
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value, type(value)))
        return 0 if parameter == self.refused else 1


@needs_glibc
@pytest.mark.parametrize('limit', [2 ** 25, numpy.int64(2 ** 27), 2 ** 31 - 1])
def test_limit_is_what_mallopt_gets(monkeypatch, limit):
    # both settings, the mmap threshold first, as a Python int (ctypes cannot pass numpy's)
    libc = FakeC(memory._glibc())
    monkeypatch.setattr(memory, '_glibc', lambda: libc)
    memory.keep_freed_memory(limit)
    assert libc.calls == [(memory.M_MMAP_THRESHOLD, int(limit), int), (memory.M_TRIM_THRESHOLD, int(limit), int)]


def test_refused_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, '_glibc', lambda: None)
    with pytest.raises(RuntimeError, match='sets glibc\'s malloc.*allocator\'s own settings'):
        memory.keep_freed_memory()


@needs_glibc
def test_refused_in_front_of_another_allocator(monkeypatch):
    monkeypatch.setattr(memory, '_malloc_is_glibcs', lambda libc: False)
    monkeypatch.setenv('LD_PRELOAD', 'libtcmalloc_minimal.so.4')
    with pytest.raises(RuntimeError, match=r'another malloc is in front of glibc\'s in this process '
                                           r'\(LD_PRELOAD=libtcmalloc_minimal.so.4\), so glibc\'s settings may not '
                                           r'be the ones that apply: keep_freed_memory changed nothing'):
        memory.keep_freed_memory()


@needs_glibc
def test_a_plain_process_calls_glibcs_malloc():
    # in a new process without LD_PRELOAD (pytest itself may run under one)
    call = 'from zennit_bnfuse import memory; print(memory._malloc_is_glibcs(memory._glibc()))'
    assert run_python(call).split()[-1] == 'True'


@needs_glibc
@pytest.mark.skipif(not PRELOADABLE, reason='no jemalloc or tcmalloc installed')
@pytest.mark.parametrize('library', PRELOADABLE or [None])
def test_refused_in_a_process_started_with_another_allocator(library):
    # the real detection, in a process with that library preloaded: keep_freed_memory refuses and names it
    call = ('from zennit_bnfuse import memory\n'
            'try:\n    memory.keep_freed_memory()\nexcept RuntimeError as error:\n    print(error)\n')
    output = run_python(call, LD_PRELOAD=library)
    assert f'another malloc is in front of glibc\'s in this process (LD_PRELOAD={library})' in output


@needs_glibc
def test_refused_mmap_threshold_changes_nothing(monkeypatch):
    libc = FakeC(memory._glibc(), refused=memory.M_MMAP_THRESHOLD)
    monkeypatch.setattr(memory, '_glibc', lambda: libc)
    with pytest.raises(RuntimeError, match=r'refused mallopt\(M_MMAP_THRESHOLD, 1073741824\) and changed nothing: '
                                           r'this glibc may cap'):
        memory.keep_freed_memory()
    assert [call[0] for call in libc.calls] == [memory.M_MMAP_THRESHOLD]


@needs_glibc
def test_refused_trim_threshold_says_what_was_set(monkeypatch):
    libc = FakeC(memory._glibc(), refused=memory.M_TRIM_THRESHOLD)
    monkeypatch.setattr(memory, '_glibc', lambda: libc)
    with pytest.raises(RuntimeError, match=r'refused mallopt\(M_TRIM_THRESHOLD, 1073741824\) after taking '
                                           r'M_MMAP_THRESHOLD: blocks of up to 1073741824 bytes now come from the '
                                           r'heap'):
        memory.keep_freed_memory()
