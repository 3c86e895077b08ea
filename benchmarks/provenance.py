'''Where a benchmark result comes from: the command that made it, the machine and the date.'''
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


# environment variables that change how glibc's malloc keeps memory, and so how often freed memory is faulted in
# again, and PyTorch's own (THP_MEM_ALLOC_ENABLE: its CPU allocator asks for transparent huge pages)
ALLOCATOR_VARIABLES = ('GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_',
                       'MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_', 'LD_PRELOAD', 'THP_MEM_ALLOC_ENABLE')


def command_line(argv=None, launcher='python'):
    '''The command as typed: ``python benchmarks/<script>.py <arguments>``, after the memory allocator's settings
    from the environment where any is set (``MALLOC_TRIM_THRESHOLD_=... python ...``); quoted for a POSIX shell where
    needed (an empty argument as ``''``), so that it runs as written.'''
    arguments = argv if argv is not None else sys.argv[1:]
    settings = [f'{name}={shlex.quote(os.environ[name])}' for name in ALLOCATOR_VARIABLES if os.environ.get(name)]
    return ' '.join([*settings, launcher, *map(shlex.quote, [Path(sys.argv[0]).as_posix(), *arguments])])


def machine(*details):
    '''Host, architecture, CPU threads, torch version, and any further details.'''
    parts = [platform.node() or 'unknown host', platform.machine(), f'{torch.get_num_threads()} CPU threads',
             f'torch {torch.__version__}', *details]
    return ', '.join(parts)


def device_description(device):
    '''``device 'cuda'`` with the GPU's name where it is one, for :py:func:`machine`.'''
    device = torch.device(device)
    if device.type == 'cuda':
        return f'device {device} ({torch.cuda.get_device_name(device)})'
    return f'device {device}'


def strict_float32():
    '''Keep float32 matrix products and convolutions in float32 on CUDA (PyTorch lets cuDNN use TF32, with a 10-bit
    mantissa, by default); no effect on the CPU.'''
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def today():
    '''The current UTC date and time.'''
    return datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def header(title, command, machine_description, date):
    '''The first lines of a results file.'''
    return [f'# {title}', '', f'- command: `{command}`', f'- machine: {machine_description}', f'- date: {date}']
