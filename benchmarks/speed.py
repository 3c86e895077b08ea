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
import json
import statistics
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
from zoo import randomized

RESULTS = Path(__file__).parent / 'results'
RULES_ALONE = 'LRP on the fuse()d copy, no canonizer (cost of the rules alone)'
FUSED = 'LRP fused (FuseBatchNorm canonizer)'
SINGLE_PASS = 'LRP fused, SinglePass'
ZPLUS_FLOOR = 'gradient + one more forward (fused model): the least exact z+ can cost'
MODELS = ('resnet50', 'vgg16_bn', 'densenet121', 'mobilenet_v2', 'efficientnet_b0')


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_start(device):
    '''Reset the peak-memory counter; returns the baseline to subtract.'''
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM, the peak resident set size
        return resident_kib('VmRSS') * 1024
    except OSError:
        return None


def resident_kib(key):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1])
    raise KeyError(key)


def peak_memory_end(device, baseline):
    '''Peak memory above the baseline since :py:func:`peak_memory_start`, in MB (None where unknown).'''
    if baseline is None:
        return None
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated(device) - baseline) / 1e6
    return (resident_kib('VmHWM') * 1024 - baseline) / 1e6


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


def measure(arch, batch, device, repeats, input_size):
    '''Rows (method -> seconds, memory, note) for one model and batch size.'''
    model, fused, input, target = setup(arch, batch, device, input_size)
    rows = {}

    def record(name, function, note=''):
        try:
            seconds, memory = timed(function, device, repeats)
            rows[name] = {'seconds': seconds, 'memory_mb': memory, 'note': note}
        except Exception as error:  # a tool that does not run on this model is a result, not a crash
            rows[name] = {'seconds': None, 'memory_mb': None,
                          'note': f'fails: {type(error).__name__}: {str(error).splitlines()[0][:70]}'}

    def forward():
        with torch.no_grad():
            return model(input)

    record('forward', forward)
    record('gradient', input_gradient(model, input, target))
    record('gradient (fused model)', input_gradient(fused, input, target))
    record(ZPLUS_FLOOR, gradient_and_forward(fused, input, target))

    composites = {
        FUSED: EpsilonPlusFlat(canonizers=[FuseBatchNorm()]),
        SINGLE_PASS: SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()])),
        'LRP-epsilon fused, SinglePass': SinglePass(epsilon(canonizers=[FuseBatchNorm()])),
        'LRP unfused (BN under Epsilon)': MixedComposite([
            LayerMapComposite([(BATCH_NORM_TYPES, Epsilon())]), EpsilonPlusFlat()]),
        'LRP naive (BN under Pass)': EpsilonPlusFlat(),
    }
    zennit_own = ResNetCanonizer() if arch.startswith('resnet') else SequentialMergeBatchNorm()
    composites[f'LRP, Zennit {type(zennit_own).__name__}'] = EpsilonPlusFlat(canonizers=[zennit_own])
    with Gradient(fused, EpsilonPlusFlat()) as attributor:
        record(RULES_ALONE,
               zennit_call(attributor, input, target, 1000))
    for name, composite in composites.items():
        try:
            with Gradient(model, composite) as attributor:
                record(name, zennit_call(attributor, input, target, 1000))
        except Exception as error:  # Zennit's own canonizer raises on some models
            rows[name] = {'seconds': None, 'memory_mb': None,
                          'note': f'fails: {type(error).__name__}: {str(error).splitlines()[0][:70]}'}
            model = randomized(arch).to(device)  # Zennit leaves a half-merged model behind

    composite_lrp = CompositeLRP(model, EpsilonPlusFlat())
    record('CompositeLRP (EpsilonPlusFlat)', lambda: composite_lrp.attribute(input, target=target))
    single_pass_lrp = CompositeLRP(model, EpsilonPlusFlat(), single_pass=True)
    record('CompositeLRP (EpsilonPlusFlat), single_pass=True', lambda: single_pass_lrp.attribute(input, target=target))
    fused_lrp = FusedLRP(model)
    record('FusedLRP (Captum rules)', lambda: fused_lrp.attribute(input, target=target))
    record('Captum LRP', lambda: LRP(model).attribute(input, target=target))

    record('one-off: fuse() (trace + fold + copy)', lambda: fuse(model))

    def apply_remove(canonizer):
        def run():
            for instance in canonizer.apply(model):
                instance.remove()
        return run

    record('one-off: canonizer apply+remove, new canonizer', lambda: apply_remove(FuseBatchNorm())())
    warm = FuseBatchNorm()
    record('one-off: canonizer apply+remove, applied before', apply_remove(warm))
    return rows


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
        'zennit_bnfuse.SinglePass; memory is the peak allocated CUDA memory above the level before the timed calls '
        '(GPU, exact) or the growth of the peak resident set (CPU: a lower bound, 0 MB where the allocator reused '
        'pages freed earlier in the run)',
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


def parse_arguments(argv, repeats, tag, doc):
    '''The options shared by the speed benchmarks, with their defaults for ``repeats`` and ``tag``.'''
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--batches', default='1,16')
    parser.add_argument('--extra', default='resnet50:8', help='more model:batch pairs (the canonizer target)')
    parser.add_argument('--devices', default='cpu,cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=repeats)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder for the tables')
    parser.add_argument('--tag', default=tag, help='file name of the tables (without extension)')
    return parser.parse_args(argv)


def run_configurations(args, measure_one):
    '''``measure_one(arch, batch, device, repeats, input_size)`` for every model, batch and device of ``args``, with a
    progress bar; returns ``{(arch, batch, device): result}``.'''
    configs = [(arch, int(batch)) for arch in args.models.split(',') for batch in args.batches.split(',')]
    configs += [(pair.split(':')[0], int(pair.split(':')[1])) for pair in args.extra.split(',') if pair]
    results = {}
    for device in args.devices.split(','):
        for arch, batch in tqdm(configs, desc=f'{args.tag} ({device})'):
            results[(arch, batch, device)] = measure_one(arch, batch, torch.device(device), args.repeats,
                                                         args.input_size)
    return results


def main(argv=None):
    args = parse_arguments(argv, repeats=3, tag='speed', doc=__doc__)
    write_report(run_configurations(args, measure), command_line(argv), args)
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
