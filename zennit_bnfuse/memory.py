'''Letting the process keep the memory it frees, so that repeated LRP calls on a CPU stop paying for page faults.

glibc's ``malloc`` maps each block of 32 MiB or more (its largest automatic threshold) from the system and unmaps
it when it is freed, and hands the free top of its heap back once it exceeds a trim threshold. The next call then
faults that memory in again, page by page, and the kernel zeroes every page. LRP keeps more tensors than a gradient
(each residual sum's operands and the sum itself), so it pays more of that; on resnet50 at batch 16 on a CPU that
was the whole of its time above the floor (``benchmarks/allocators.sh``, whose tables give the page faults per call
beside the times).

The settings are the process's, not this package's. :py:func:`keep_freed_memory` changes them only when called: the
same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set, for where that is
awkward (a notebook whose kernel is already running).
'''
import ctypes
import ctypes.util
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes a C int
LARGEST_LIMIT = 2 ** 31 - 1


def glibc():
    '''The C library of this process, as a :py:class:`ctypes.CDLL`, if it is glibc; else None.'''
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


def malloc_is_glibcs(libc):
    '''Whether the ``malloc`` this process calls is ``libc``'s own, not another allocator's put in front of it (as
    ``LD_PRELOAD`` does with jemalloc or tcmalloc).'''
    def address(function):
        return ctypes.cast(function, ctypes.c_void_p).value
    return address(ctypes.CDLL(None).malloc) == address(libc.malloc)


def keep_freed_memory(limit=2 ** 30):
    '''Tell glibc's ``malloc`` to serve blocks of up to ``limit`` bytes from its heap and to keep up to ``limit``
    bytes of free heap rather than hand them back to the system.

    This is process-wide and stays until the process ends or the settings are changed again (glibc has no way to
    read the ones it had; before, it adjusted its thresholds itself, up to 32 MiB and 64 MiB). The process then holds
    on to the memory of its largest call, up to ``limit`` more: call this where memory is plentiful and many calls
    of the same size follow (a benchmark, explaining a dataset). Tensors larger than ``limit`` are still mapped and
    unmapped each time.

    Parameters
    ----------
    limit: int
        Bytes, at least 1 MiB and below 2 GiB (mallopt takes a C int); the default is 1 GiB, above the largest
        feature map of resnet50 at batch 16 (49 MiB).

    Raises
    ------
    ValueError
        If ``limit`` is out of that range.
    RuntimeError
        If the C library is not glibc (musl, macOS, Windows), if another allocator was put in front of glibc's (its
        own settings apply: jemalloc's ``MALLOC_CONF``, tcmalloc's environment), or if glibc refuses a setting.
    '''
    if isinstance(limit, bool) or not isinstance(limit, int) or not 2 ** 20 <= limit <= LARGEST_LIMIT:
        raise ValueError(f'limit must be an int of bytes from 1 MiB (1048576) to {LARGEST_LIMIT}, got {limit!r}')
    libc = glibc()
    if libc is None:
        raise RuntimeError(f'keep_freed_memory sets glibc\'s malloc, and this process runs on '
                           f'{platform.system()} with {platform.libc_ver()[0] or "another C library"}: use that '
                           'allocator\'s own settings, or none')
    if not malloc_is_glibcs(libc):
        preloaded = os.environ.get('LD_PRELOAD', '')
        named = f' (LD_PRELOAD={preloaded})' if preloaded else ''
        raise RuntimeError(f'this process\'s malloc is not glibc\'s{named}'
                           ', so glibc\'s settings would not apply: that allocator keeps memory by its own settings')
    for parameter, name in ((M_MMAP_THRESHOLD, 'M_MMAP_THRESHOLD'), (M_TRIM_THRESHOLD, 'M_TRIM_THRESHOLD')):
        if libc.mallopt(parameter, limit) != 1:
            raise RuntimeError(f'glibc refused mallopt({name}, {limit}); try a smaller limit')
