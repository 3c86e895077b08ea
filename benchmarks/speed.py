'''Speed and memory of LRP with BatchNorm handled by fusion, against the plain gradient, Zennit and Captum.

For each model and batch size this times (median of ``--repeats`` calls after one warm-up): the plain forward, the
plain input gradient (the floor: LRP is a modified gradient) on the original and on the fused model, LRP with
EpsilonPlusFlat under each BatchNorm handling (Zennit attributor; fused = FuseBatchNorm canonizer), the fused
composite computed by :py:class:`~zennit_bnfuse.SinglePass` (EpsilonPlusFlat, and LRP-epsilon everywhere), the
plain gradient plus one more forward pass (the least an exact z+ rule can cost: it needs the layers' outputs under
positive weights besides their own), CompositeLRP, FusedLRP, Zennit's own canonizers and Captum's LRP where they
run; the one-off cost of ``fuse()`` and of the canonizer's apply+remove (a new canonizer, and one that applied
before); and the peak memory of each. All ratios are to the plain gradient measured in the same run. Writes
``benchmarks/results/speed.md`` and ``speed.json``.

    python benchmarks/speed.py
'''
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from captum.attr import LRP
from tqdm.auto import tqdm
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat, LayerMapComposite, MixedComposite
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer

from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, SinglePass, fuse
from zennit_bnfuse.evaluation.composites import epsilon
from zennit_bnfuse.fold import BATCH_NORM_TYPES

from provenance import command_line, header, machine, today
from zoo import randomized as randomized_in_suite

RESULTS = Path(__file__).parent / 'results'
RULES_ALONE = 'LRP on the fuse()d copy, no canonizer (cost of the rules alone)'
FUSED = 'LRP fused (FuseBatchNorm canonizer)'
SINGLE_PASS = 'LRP fused, SinglePass'
COMPOSITE_LRP = 'CompositeLRP (EpsilonPlusFlat), default engine (SinglePass)'
ZPLUS_FLOOR = 'gradient + one more forward (fused model): the least exact z+ can cost'
MODELS = ('resnet50', 'vgg16_bn', 'densenet121', 'mobilenet_v2', 'efficientnet_b0')


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_start(device):
    '''Reset the CUDA peak-memory counter; returns the baseline to subtract (None on CPU).'''
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return None


def peak_memory_end(device, baseline):
    '''Peak allocated CUDA memory above the baseline since :py:func:`peak_memory_start`, in MB (None on CPU).'''
    if baseline is None:
        return None
    return (torch.cuda.max_memory_allocated(device) - baseline) / 1e6


def timed(function, device, repeats):
    '''Median seconds of ``repeats`` calls after one warm-up call, and the peak memory of those calls.'''
    function()
    synchronize(device)
    baseline = peak_memory_start(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_memory_end(device, baseline)


def input_gradient(model, input, target):
    def run():
        batch = input.clone().requires_grad_(True)
        output = model(batch)
        return torch.autograd.grad(output.gather(1, target[:, None]).sum(), batch)[0]
    return run


def zennit_call(attributor, input, target, classes):
    def run():
        return attributor(input, torch.eye(classes, device=input.device)[target])[1]
    return run


def randomized(arch):
    '''The randomised torchvision model ``arch``, or timm model ``NAME`` for ``arch='timm/NAME'`` (see
    :py:func:`zoo.randomized`).'''
    if arch.startswith('timm/'):
        return randomized_in_suite('timm', arch.removeprefix('timm/'))
    return randomized_in_suite('torchvision', arch)


def setup(arch, batch, device, input_size):
    '''The randomised model ``arch``, its fused copy, a batch of random images and random targets (seed 0).'''
    model = randomized(arch).to(device)
    generator = torch.Generator().manual_seed(0)
    input = torch.rand(batch, 3, input_size, input_size, generator=generator).to(device)
    target = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    fused, _ = fuse(model)
    return model, fused, input, target


def gradient_and_forward(fused, input, target):
    '''The plain input gradient of ``fused`` plus one more forward pass: the least an exact z+ rule can cost.'''
    gradient = input_gradient(fused, input, target)

    def run():
        with torch.no_grad():
            fused(input)
        return gradient()
    return run


class Bench:
    '''What the methods of one configuration share: the randomised model, its fused copy, the input, the targets,
    and the attributor contexts the methods keep open while they are timed.'''
    def __init__(self, arch, batch, device, input_size):
        self.arch, self.device = arch, device
        self.model, self.fused, self.input, self.target = setup(arch, batch, device, input_size)
        self.contexts = None  # the ExitStack of the method being timed

    @contextlib.contextmanager
    def method(self, make):
        '''The timed function ``make(self)``, with the attributor contexts it opens closed on exit.'''
        with contextlib.ExitStack() as self.contexts:
            yield make(self)

    def zennit(self, composite, model=None):
        '''An attribution with ``composite`` in a Zennit attributor context that stays open.'''
        model = self.model if model is None else model
        try:
            attributor = self.contexts.enter_context(Gradient(model, composite))
        except Exception:  # Zennit's own canonizers raise on some models, and leave a half-merged model behind
            self.model = randomized(self.arch).to(self.device)
            raise
        return zennit_call(attributor, self.input, self.target, 1000)

    def attribution(self, lrp):
        '''One call of a Captum-style attribution object.'''
        return lambda: lrp.attribute(self.input, target=self.target)

    def forward(self):
        def run():
            with torch.no_grad():
                return self.model(self.input)
        return run

    def apply_remove(self, canonizer):
        '''Apply a canonizer to the model and remove it again.'''
        def run():
            for instance in canonizer.apply(self.model):
                instance.remove()
        return run


def methods(arch):
    '''The methods timed for model ``arch``, in order: ``(name, function (bench) -> the timed function, whether its
    peak memory is measured)``.'''
    zennit_own = ResNetCanonizer if arch.startswith('resnet') else SequentialMergeBatchNorm
    return [
        ('forward', lambda bench: bench.forward(), True),
        ('gradient', lambda bench: input_gradient(bench.model, bench.input, bench.target), True),
        ('gradient (fused model)', lambda bench: input_gradient(bench.fused, bench.input, bench.target), True),
        (ZPLUS_FLOOR, lambda bench: gradient_and_forward(bench.fused, bench.input, bench.target), True),
        (RULES_ALONE, lambda bench: bench.zennit(EpsilonPlusFlat(), bench.fused), True),
        (FUSED, lambda bench: bench.zennit(EpsilonPlusFlat(canonizers=[FuseBatchNorm()])), True),
        (SINGLE_PASS, lambda bench: bench.zennit(SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()]))), True),
        ('LRP-epsilon fused, SinglePass', lambda bench: bench.zennit(SinglePass(epsilon(canonizers=[FuseBatchNorm()]))),
         True),
        ('LRP unfused (BN under Epsilon)', lambda bench: bench.zennit(MixedComposite([
            LayerMapComposite([(BATCH_NORM_TYPES, Epsilon())]), EpsilonPlusFlat()])), True),
        ('LRP naive (BN under Pass)', lambda bench: bench.zennit(EpsilonPlusFlat()), True),
        (f'LRP, Zennit {zennit_own.__name__}', lambda bench: bench.zennit(EpsilonPlusFlat(canonizers=[zennit_own()])),
         True),
        (COMPOSITE_LRP, lambda bench: bench.attribution(CompositeLRP(bench.model, EpsilonPlusFlat())), True),
        ('CompositeLRP (EpsilonPlusFlat), engine=\'zennit\'', lambda bench: bench.attribution(
            CompositeLRP(bench.model, EpsilonPlusFlat(), engine='zennit')), True),
        ('FusedLRP (Captum rules), default engine', lambda bench: bench.attribution(FusedLRP(bench.model)), True),
        ('FusedLRP (Captum rules), engine=\'captum\'', lambda bench: bench.attribution(
            FusedLRP(bench.model, engine='captum')), True),
        ('Captum LRP', lambda bench: bench.attribution(LRP(bench.model)), True),
        ('one-off: fuse() (trace + fold + copy)', lambda bench: lambda: fuse(bench.model), False),
        ('one-off: canonizer apply+remove, new canonizer',
         lambda bench: lambda: bench.apply_remove(FuseBatchNorm())(), False),
        ('one-off: canonizer apply+remove, applied before', lambda bench: bench.apply_remove(FuseBatchNorm()), False),
    ]


def failure(error):
    '''The note of a method that does not run on a model (a result, not a crash).'''
    return f'fails: {type(error).__name__}: {str(error).splitlines()[0][:70]}'


def measure(arch, batch, device, repeats, input_size, memory='subprocess'):
    '''Rows (method -> seconds, memory, note) for one model and batch size. Peak memory: on CUDA the peak allocated
    memory during the timed calls; on CPU, with ``memory='subprocess'``, the peak resident set of a process that
    builds the model and calls the method twice, minus that of one that only builds the model
    (:py:func:`peak_resident_kib`); None otherwise.'''
    bench = Bench(arch, batch, device, input_size)
    rows = {}
    subprocesses = memory == 'subprocess' and device.type != 'cuda'
    baseline = peak_resident_kib(arch, batch, device, input_size) if subprocesses else None
    for name, make, measures_memory in methods(arch):
        try:
            with bench.method(make) as function:
                seconds, peak = timed(function, device, repeats)
            if subprocesses and measures_memory:
                peak = (peak_resident_kib(arch, batch, device, input_size, name) - baseline) * 1024 / 1e6
            rows[name] = {'seconds': seconds, 'memory_mb': peak, 'note': ''}
        except Exception as error:  # a tool that does not run on this model is a result, not a crash
            rows[name] = {'seconds': None, 'memory_mb': None, 'note': failure(error)}
    return rows


def peak_resident_kib(arch, batch, device, input_size, method=None):
    '''The peak resident set size (KiB, :py:func:`own_peak_resident_kib`) of a new process that builds the model of
    this configuration and, given a ``method`` name, calls it twice.'''
    configuration = json.dumps({'arch': arch, 'batch': batch, 'device': str(device), 'input_size': input_size,
                                'method': method})
    result = subprocess.run([sys.executable, __file__, '--memory-child', configuration], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parent,
                            env={**os.environ, 'PYTHONPATH': os.pathsep.join(
                                filter(None, [str(Path(__file__).parent.parent), os.environ.get('PYTHONPATH')]))})
    return json.loads(result.stdout.splitlines()[-1])['peak_kib']


def memory_child(configuration):
    '''In a new process: build the configuration's model, call the method (if any) twice, print the peak resident
    set size.'''
    configuration = json.loads(configuration)
    bench = Bench(configuration['arch'], configuration['batch'], torch.device(configuration['device']),
                  configuration['input_size'])
    if configuration['method'] is not None:
        make = dict((name, make) for name, make, _ in methods(configuration['arch']))[configuration['method']]
        with bench.method(make) as function:
            function()
            function()
    print(json.dumps({'peak_kib': own_peak_resident_kib()}))


def own_peak_resident_kib():
    '''This process's peak resident set size in KiB: ``VmHWM`` where Linux has it (the high-water mark of this
    process's own memory), else ``ru_maxrss``. On Linux ``ru_maxrss`` keeps the parent's peak across fork and exec,
    so a child started by a large benchmark process would report at least the parent's size.'''
    status = Path('/proc/self/status')
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def ratio(rows, name, reference='gradient'):
    if rows[name]['seconds'] is None or rows[reference]['seconds'] is None:
        return None
    return rows[name]['seconds'] / rows[reference]['seconds']


def write_report(results, command, args):
    host = machine(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
    date = today()
    lines = header('Speed and memory of BatchNorm handling for LRP', command, host, date) + [
        f'- input {args.input_size}x{args.input_size}, median of {args.repeats} calls after one warm-up; ratios are '
        'to the plain input gradient of the same model, batch and device, measured in the same run',
        '- LRP rows use Zennit\'s EpsilonPlusFlat unless they say LRP-epsilon; "fused" is the FuseBatchNorm '
        'canonizer inside one Zennit attributor context; SinglePass rows compute the same composite with '
        'zennit_bnfuse.SinglePass',
        '- peak memory: on CUDA the peak allocated memory above the level before the timed calls; on CPU (with '
        '--memory subprocess) the peak resident set (VmHWM; ru_maxrss keeps the parent\'s peak across fork and exec '
        'on Linux) of a new process that builds the model and calls the method twice, minus that of a process that '
        'only builds the model',
        '',
    ]
    checks = []
    for (arch, batch, device), rows in results.items():
        lines += [f'## {arch}, batch {batch}, {device}', '',
                  '| method | median time | × gradient | peak memory | note |', '| --- | --- | --- | --- | --- |']
        for name, row in rows.items():
            seconds = '-' if row['seconds'] is None else f'{1000 * row["seconds"]:.1f} ms'
            factor = ratio(rows, name)
            memory = '-' if row['memory_mb'] is None else f'{row["memory_mb"]:.0f} MB'
            lines.append(f'| {name} | {seconds} | {"-" if factor is None else f"{factor:.2f}"} | {memory} | '
                         f'{row["note"]} |')
        checks.append((arch, batch, device, ratio(rows, FUSED, 'gradient (fused model)'),
                       ratio(rows, SINGLE_PASS, 'gradient (fused model)'),
                       ratio(rows, ZPLUS_FLOOR, 'gradient (fused model)'),
                       ratio(rows, 'LRP-epsilon fused, SinglePass', 'gradient (fused model)'),
                       ratio(rows, FUSED, 'LRP unfused (BN under Epsilon)'),
                       ratio(rows, 'one-off: canonizer apply+remove, new canonizer', SINGLE_PASS),
                       ratio(rows, 'one-off: canonizer apply+remove, applied before', SINGLE_PASS)))
        lines.append('')
    lines += ['## Targets', '',
              'Ratios to the plain input gradient of the fused model. "Zennit\'s hooks" is EpsilonPlusFlat with the '
              'FuseBatchNorm canonizer as Zennit computes it; "SinglePass" is the same composite and the same '
              'relevance (tests/test_singlepass.py) computed by zennit_bnfuse.SinglePass; "floor" is the gradient '
              'plus one more forward pass, which any exact z+ rule needs (EpsilonPlusFlat puts z+ on every conv); '
              'LRP-epsilon needs no extra pass. Canonizer costs are shares of one SinglePass call.', '',
              '| model | batch | device | fused LRP, Zennit\'s hooks | fused LRP, SinglePass (target ≤ 1.5) | '
              'floor of exact z+ | LRP-epsilon, SinglePass | fused / unfused LRP, Zennit\'s hooks (target ≤ 1) | '
              'apply+remove, new canonizer | same, applied before (target < 5%) |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']

    def cell(value, percent=False):
        if value is None:
            return '-'
        return f'{100 * value:.1f}%' if percent else f'{value:.2f}'

    for arch, batch, device, *values in checks:
        cells = [cell(value) for value in values[:5]] + [cell(value, True) for value in values[5:]]
        lines.append(f'| {arch} | {batch} | {device} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    write_tables(lines, results, command, host, date, args)


def write_tables(lines, results, command, host, date, args):
    '''Write the Markdown ``lines`` and the raw ``results`` as ``<tag>.md`` and ``<tag>.json`` in ``args.out``.'''
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'{args.tag}.md').write_text('\n'.join(lines))
    (args.out / f'{args.tag}.json').write_text(json.dumps(
        {'command': command, 'machine': host, 'date': date,
         'results': [{'model': arch, 'batch': batch, 'device': device, 'rows': rows}
                     for (arch, batch, device), rows in results.items()]}, indent=1) + '\n')


def parse_arguments(argv, repeats, tag, doc, methods=None, memory=False, models=MODELS, batches='1,16',
                    extra='resnet50:8', keep_memory=False):
    '''The options shared by the speed benchmarks, with their defaults for ``repeats``, ``tag``, ``models``,
    ``batches`` and ``extra``; given the names of a script's ``methods``, ``--methods`` to time only some of them;
    with ``memory``, ``--memory``; with ``keep_memory``, ``--keep-freed-memory``.'''
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if memory:
        parser.add_argument('--memory', choices=('subprocess', 'none'), default='subprocess',
                            help='peak memory on CPU: one new process per method (ru_maxrss), or not measured')
    if methods is not None:
        parser.add_argument('--methods', default=','.join(methods), type=choices(methods),
                            help=f'comma-separated, from: {", ".join(methods)}')
    parser.add_argument('--models', default=','.join(models),
                        help='torchvision model names, or timm/NAME for timm models (timm installed)')
    parser.add_argument('--batches', default=batches)
    if keep_memory:
        parser.add_argument('--keep-freed-memory', action='store_true',
                            help='call zennit_bnfuse.keep_freed_memory() first (glibc keeps what it frees)')
    parser.add_argument('--extra', default=extra, help='more model:batch pairs (the canonizer target)')
    parser.add_argument('--devices', default='cpu,cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=repeats)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder for the tables')
    parser.add_argument('--tag', default=tag, help='file name of the tables (without extension)')
    return parser.parse_args(argv)


def choices(allowed):
    '''An argparse type: a comma-separated list of names from ``allowed``.'''
    def parse(value):
        unknown = [name for name in value.split(',') if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f'unknown {", ".join(unknown)}; choose from {", ".join(allowed)}')
        return value
    return parse


def run_configurations(args, measure_one, after_each=None):
    '''``measure_one(arch, batch, device, repeats, input_size)`` for every model, batch and device of ``args``, with a
    progress bar; returns ``{(arch, batch, device): result}``. ``after_each(results so far)`` runs after each (to
    write the tables as they grow, so that a run cut short keeps what it measured).'''
    configs = [(arch, int(batch)) for arch in args.models.split(',') for batch in args.batches.split(',')]
    configs += [(pair.split(':')[0], int(pair.split(':')[1])) for pair in args.extra.split(',') if pair]
    results = {}
    for device in args.devices.split(','):
        for arch, batch in tqdm(configs, desc=f'{args.tag} ({device})'):
            results[(arch, batch, device)] = measure_one(arch, batch, torch.device(device), args.repeats,
                                                         args.input_size)
            if after_each is not None:
                after_each(results)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--memory-child']:
        return memory_child(argv[1])
    args = parse_arguments(argv, repeats=3, tag='speed', doc=__doc__, memory=True)
    command = command_line(argv)
    run_configurations(args, lambda *config: measure(*config, memory=args.memory),
                       after_each=lambda results: write_report(results, command, args))
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
