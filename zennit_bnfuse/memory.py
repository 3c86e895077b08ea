'''Letting the process keep the memory it frees, so that repeated LRP calls on a CPU stop paying for page faults.

glibc's ``malloc`` maps each block above its mmap threshold from the system and unmaps it when it is freed (the
threshold starts at 128 KiB and rises with the blocks freed, up to 32 MiB), and hands the free top of its heap back
once that exceeds a trim threshold. The next call then faults that memory in again, page by page, and the kernel
zeroes every page. LRP keeps more tensors than a gradient (each residual sum's operands and the sum itself), so it
pays more of that; on resnet50 at batch 16 on a CPU that was most of its time above the floor
(``benchmarks/allocators.sh``, whose tables give the page faults per call beside the times).

The settings are the process's, not this package's. :py:func:`keep_freed_memory` changes them only when called: the
same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set, for where that is
awkward (a notebook whose kernel is already running).
'''
import ctypes
import ctypes.util
import operator
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest automatic mmap threshold on 64-bit: a fixed one below it maps blocks its own adjustment would keep
SMALLEST_LIMIT = 2 ** 25
# mallopt takes a C int
LARGEST_LIMIT = 2 ** 31 - 1


def _glibc():
    '''The C library of this process, as a :py:class:`ctypes.CDLL`, if it is glibc; else None.'''
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


def _malloc_is_glibcs(libc):
    '''Whether the ``malloc`` this process calls is ``libc``'s own, not another one put in front of it (as
    ``LD_PRELOAD`` does with jemalloc or tcmalloc).'''
    def address(function):
        return ctypes.cast(function, ctypes.c_void_p).value
    return address(ctypes.CDLL(None).malloc) == address(libc.malloc)


def _as_limit(limit):
    '''``limit`` as a Python int of bytes within what :py:func:`keep_freed_memory` takes, or a ValueError.'''
    try:
        value = None if isinstance(limit, bool) else operator.index(limit)
    except TypeError:
        value = None
    if value is not None and SMALLEST_LIMIT <= value <= LARGEST_LIMIT:
        return value
    if value is None:
        why = 'an int of bytes'
    elif value < SMALLEST_LIMIT:
        why = 'a smaller fixed threshold maps blocks that glibc\'s own adjustment would keep'
    else:
        why = 'mallopt takes a C int'
    raise ValueError(f'limit must be an int of bytes from 32 MiB ({SMALLEST_LIMIT}) to {LARGEST_LIMIT}, got '
                     f'{limit!r} ({why})')


def keep_freed_memory(limit=2 ** 30):
    '''Tell glibc's ``malloc`` to serve blocks of up to ``limit`` bytes from its heap and to keep up to ``limit``
    bytes of free heap rather than hand them back to the system.

    This is process-wide and cannot be undone: glibc has no way to read the settings it had, and fixing them
    switches off its own adjustment of them for the rest of the process (before, it raised its thresholds itself, up
    to 32 MiB and 64 MiB on 64-bit). The process then holds on to the memory of its largest call: its resident memory
    stays near its peak between calls, up to ``limit`` of it free. Call this where memory is plentiful and many calls
    of the same size follow (a benchmark, explaining a dataset); ``ctypes.CDLL('libc.so.6').malloc_trim(0)`` hands
    the free memory back when you need it.

    It helps the allocations of the main thread, which is where PyTorch's forward and backward passes on a CPU
    allocate when they are called from it. The arenas of other threads grow in heaps of at most 64 MiB (on 64-bit),
    so their larger blocks are still mapped each time, and a heap that becomes entirely free is unmapped
    (``MALLOC_ARENA_MAX=1`` in the environment puts every thread on the main heap). Blocks larger than ``limit`` are
    mapped and unmapped each time too.

    Parameters
    ----------
    limit: int
        Bytes, from 32 MiB (glibc's largest automatic mmap threshold on 64-bit) to below 2 GiB (mallopt takes a C
        int); the default is 1 GiB, above the largest feature map of resnet50 at batch 16 (49 MiB).

    Raises
    ------
    ValueError
        If ``limit`` is not an int in that range.
    RuntimeError
        If the C library is not glibc (musl, macOS, Windows), if another ``malloc`` was put in front of glibc's (set
        that allocator's own: jemalloc's ``MALLOC_CONF``, tcmalloc's environment), or if glibc refuses a setting
        (some versions take mmap thresholds of 32 MiB at most, and then nothing is changed).
    '''
    limit = _as_limit(limit)
    libc = _glibc()
    if libc is None:
        raise RuntimeError(f'keep_freed_memory sets glibc\'s malloc, and this process runs on '
                           f'{platform.system()} with {platform.libc_ver()[0] or "another C library"}: use that '
                           'allocator\'s own settings, or none')
    if not _malloc_is_glibcs(libc):
        preloaded = os.environ.get('LD_PRELOAD', '')
        named = f' (LD_PRELOAD={preloaded})' if preloaded else ''
        raise RuntimeError(f'another malloc is in front of glibc\'s in this process{named}, so glibc\'s settings '
                           'may not be the ones that apply: keep_freed_memory changed nothing; set that allocator\'s '
                           'own (jemalloc\'s MALLOC_CONF, tcmalloc\'s environment)')
    # the mmap threshold first: where glibc caps it, the process is left as it was
    if libc.mallopt(M_MMAP_THRESHOLD, limit) != 1:
        raise RuntimeError(f'glibc refused mallopt(M_MMAP_THRESHOLD, {limit}) and changed nothing: this glibc may '
                           'cap the mmap threshold at 32 MiB (mallopt(3)), which keeps no more than its own '
                           'adjustment; tcmalloc or jemalloc (LD_PRELOAD) keep freed memory instead')
    if libc.mallopt(M_TRIM_THRESHOLD, limit) != 1:
        raise RuntimeError(f'glibc refused mallopt(M_TRIM_THRESHOLD, {limit}) after taking M_MMAP_THRESHOLD: blocks '
                           f'of up to {limit} bytes now come from the heap, but it still hands free memory back by '
                           'the trim threshold it had')
