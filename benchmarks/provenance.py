'''Where a benchmark result comes from: the command that made it, the machine and the date.'''
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def command_line(argv=None, launcher='python'):
    '''The command as typed: ``python benchmarks/<script>.py <arguments>``.'''
    arguments = argv if argv is not None else sys.argv[1:]
    return ' '.join([launcher, Path(sys.argv[0]).as_posix(), *arguments])


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
