'''Large allocations and page faults per call: where LRP's time above the floor goes on a CPU with glibc's malloc.

glibc serves an allocation of 32 MiB or more (its largest automatic ``mmap`` threshold) from memory it asks the
system for, and hands it back when it is freed, unless a free block of the heap fits it; such memory is faulted in
again, page by page, by the next call that writes it. For each method of ``speed_interleaved.py`` given, after one
warm-up call, this counts in one call the new tensors of at least ``--threshold`` MiB (a ``TorchDispatchMode`` sees
every operator, the backward pass's included: a tensor counts when its memory is none of the operator's arguments'),
by operator and by the line of this package (or Zennit) that called it, and the process's minor page faults per
call (the median of ``--repeats`` calls; they vary from call to call with what the allocator kept).

Writes ``benchmarks/results/allocations.md`` and ``.json``.

    python benchmarks/allocations.py                          # resnet50 at batch 16: the floor and CompositeLRP
    python benchmarks/allocations.py --models resnet50 --batches 1,16 --methods floor,composite,fused
'''
import argparse
import collections
import json
import resource
import statistics
import traceback
from pathlib import Path

import torch
import zennit
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

import zennit_bnfuse

from provenance import command_line, header, machine, today
from speed import RESULTS, setup
from speed_interleaved import METHODS

# the folders of this package and of Zennit, whose lines the tables name
PACKAGES = tuple(Path(package.__file__).resolve().parent for package in (zennit_bnfuse, zennit))


def caller():
    '''``file:line`` of the innermost frame of this package or of Zennit on the stack, or ``autograd / the model``
    where none is (autograd's own backward functions, the model's forward).'''
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if any(path.is_relative_to(package) for package in PACKAGES):
            return f'{"/".join(path.parts[-2:])}:{frame.lineno}'
    return 'autograd / the model'


class LargeAllocations(TorchDispatchMode):
    '''Counts, while active, the operators' new output tensors of at least ``threshold`` bytes by (operator,
    caller).'''
    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.counts, self.bytes = threshold, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # the arguments' memory before the call: an ``out=`` tensor the operator resizes gets new memory
        given = {argument.untyped_storage().data_ptr() for argument in (*args, *kwargs.values())
                 if isinstance(argument, torch.Tensor)}
        output = func(*args, **kwargs)
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != 'cpu':
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() >= self.threshold and storage.data_ptr() not in given:
                key = (str(func.overloadpacket.__name__), caller())
                self.counts[key] += 1
                self.bytes[key] += storage.nbytes()
        return output


def minor_faults():
    '''The process's minor page faults so far.'''
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(arch, batch, input_size, methods, threshold, repeats):
    '''For each method name, the large allocations of one call (by operator and caller) and the median minor page
    faults of ``repeats`` others, after a warm-up call.'''
    model, fused, input, target = setup(arch, batch, torch.device('cpu'), input_size)
    results = {}
    for name in methods:
        row, make = METHODS[name]
        call = make(model, fused, input, target)
        call()
        faults = []
        for _ in range(repeats):
            before = minor_faults()
            call()
            faults.append(minor_faults() - before)
        with LargeAllocations(threshold) as allocations:
            call()
        results[row] = {
            'page_faults': statistics.median(faults),
            'page_faults_per_call': faults,
            'allocations': sum(allocations.counts.values()),
            'mib': sum(allocations.bytes.values()) / 2 ** 20,
            'by_site': [{'operator': operator, 'caller': where, 'count': count,
                         'mib': allocations.bytes[operator, where] / 2 ** 20}
                        for (operator, where), count in sorted(allocations.counts.items(), key=lambda item: -item[1])],
        }
    return results


def write_report(results, args, out):
    '''``allocations.md`` and ``.json`` in ``out``.'''
    command, host, date = command_line(), machine(), today()
    lines = header('Large allocations and page faults per call', command, host, date) + [
        f'- input {args.input_size}x{args.input_size}; one warm-up call, then one call counted with a '
        f'TorchDispatchMode (new tensors of at least {args.threshold:g} MiB, the backward pass included); minor page '
        f'faults (getrusage): the median of {args.repeats} more calls, each counted alone',
        '- glibc serves allocations of 32 MiB or more from memory it gets from the system and gives back when they are '
        'freed (unless a free block of its heap fits), so each of those is faulted in again by the call that writes '
        'it', '', '## Per call', '',
        f'| model | batch | method | tensors of {args.threshold:g} MiB or more | their MiB | minor page faults '
        '(median) |',
        '| --- | --- | --- | --- | --- | --- |']
    for (arch, batch), methods in results.items():
        for row, result in methods.items():
            lines.append(f'| {arch} | {batch} | {row} | {result["allocations"]} | {result["mib"]:.1f} | '
                         f'{result["page_faults"]:.0f} |')
    lines += ['', '## By operator and caller', '',
              '| model | batch | method | operator | called from | tensors | MiB |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for (arch, batch), methods in results.items():
        for row, result in methods.items():
            for site in result['by_site']:
                lines.append(f'| {arch} | {batch} | {row} | {site["operator"]} | {site["caller"]} | {site["count"]} | '
                             f'{site["mib"]:.1f} |')
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{args.tag}.md').write_text('\n'.join(lines) + '\n')
    (out / f'{args.tag}.json').write_text(json.dumps({
        'command': command, 'machine': host, 'date': date, 'threshold_mib': args.threshold,
        'results': [{'model': arch, 'batch': batch, 'method': row, **result}
                    for (arch, batch), methods in results.items() for row, result in methods.items()],
    }, indent=1) + '\n')


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='resnet50', help='torchvision model names, or timm/NAME (timm installed)')
    parser.add_argument('--batches', default='16')
    parser.add_argument('--methods', default='floor,composite',
                        help=f'comma-separated, from: {", ".join(METHODS)}')
    parser.add_argument('--threshold', type=float, default=32., help='MiB; glibc\'s largest automatic mmap threshold')
    parser.add_argument('--repeats', type=int, default=3, help='calls whose page faults are counted')
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder for the tables')
    parser.add_argument('--tag', default='allocations', help='file name of the tables (without extension)')
    args = parser.parse_args(argv)
    unknown = [name for name in args.methods.split(',') if name not in METHODS]
    if unknown:
        parser.error(f'unknown method {", ".join(unknown)}; choose from {", ".join(METHODS)}')
    return args


def main(argv=None):
    args = parse_arguments(argv)
    configurations = [(arch, int(batch)) for arch in args.models.split(',') for batch in args.batches.split(',')]
    results = {}
    for arch, batch in tqdm(configurations, desc='allocations'):
        results[arch, batch] = measure(arch, batch, args.input_size, args.methods.split(','),
                                       args.threshold * 2 ** 20, args.repeats)
    write_report(results, args, args.out)


if __name__ == '__main__':
    main()
