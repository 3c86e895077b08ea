'''LRP with SinglePass against Zennit's hooks, the plain gradient and the least exact z+ can cost, timed round-robin.

``speed.py`` times one method after another, so a machine whose speed drifts over minutes (a shared virtual machine)
moves its ratios. Here every repeat times each method once, in turn, and the table gives the median over repeats of
each method's time divided by the plain gradient's time in the same repeat. Each LRP call enters and leaves its
Zennit attributor context (canonizer apply + remove included, as for a user who makes one call per context).
Writes ``benchmarks/results/speed-interleaved.md`` and ``.json``.

    python benchmarks/speed_interleaved.py
'''
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import FuseBatchNorm, SinglePass, fuse
from zennit_bnfuse.composites import epsilon

from provenance import command_line, header, machine, today
from speed import MODELS, input_gradient, synchronize
from zoo import randomized

RESULTS = Path(__file__).parent / 'results'
METHODS = {
    'gradient + one more forward (the least exact z+ can cost)': None,
    'EpsilonPlusFlat, fused, Zennit\'s hooks': lambda: EpsilonPlusFlat(canonizers=[FuseBatchNorm()]),
    'EpsilonPlusFlat, fused, SinglePass': lambda: SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()])),
    'LRP-epsilon, fused, SinglePass': lambda: SinglePass(epsilon(canonizers=[FuseBatchNorm()])),
}


def lrp_call(model, composite, input, target):
    '''One attribution: enter the composite's context, attribute, leave.'''
    def run():
        with Gradient(model, composite) as attributor:
            return attributor(input, torch.nn.functional.one_hot(target, 1000).to(input))[1]
    return run


def measure(arch, batch, device, repeats, input_size):
    '''Per-repeat ratios to the plain gradient of the fused model, for each method.'''
    model = randomized(arch).to(device)
    generator = torch.Generator().manual_seed(0)
    input = torch.rand(batch, 3, input_size, input_size, generator=generator).to(device)
    target = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    fused, _ = fuse(model)
    gradient = input_gradient(fused, input, target)

    def gradient_and_forward():
        with torch.no_grad():
            fused(input)
        return gradient()

    functions = {'gradient (fused model)': gradient}
    for name, make_composite in METHODS.items():
        functions[name] = gradient_and_forward if make_composite is None else lrp_call(
            model, make_composite(), input, target)
    seconds = {name: [] for name in functions}
    for function in functions.values():  # warm-up
        function()
    synchronize(device)
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    reference = seconds['gradient (fused model)']
    return {name: {'seconds': values, 'median_ratio': statistics.median(
                       value / base for value, base in zip(values, reference))}
            for name, values in seconds.items()}


def write_report(results, command, args):
    host = machine(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
    date = today()
    names = list(METHODS)
    lines = header('LRP speed, timed round-robin', command, host, date) + [
        f'- input {args.input_size}x{args.input_size}; {args.repeats} repeats after one warm-up, each timing every '
        'method once in turn; a cell is the median over repeats of the method\'s time / the plain input gradient '
        'of the fused model in the same repeat (the last column is that gradient\'s median time)',
        '- "the least exact z+ can cost": EpsilonPlusFlat puts z+ on every conv but the first; z+ needs each '
        'layer\'s output under positive weights besides its own, so at least one more forward pass than a gradient',
        '',
        '| model | batch | device | ' + ' | '.join(names) + ' | gradient (fused model) |',
        '| --- | --- | --- | ' + ' | '.join('---' for _ in names) + ' | --- |',
    ]
    for (arch, batch, device), rows in results.items():
        gradient = statistics.median(rows['gradient (fused model)']['seconds'])
        lines.append(f'| {arch} | {batch} | {device} | '
                     + ' | '.join(f'{rows[name]["median_ratio"]:.2f}' for name in names)
                     + f' | {1000 * gradient:.1f} ms |')
    lines.append('')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'{args.tag}.md').write_text('\n'.join(lines))
    (args.out / f'{args.tag}.json').write_text(json.dumps(
        {'command': command, 'machine': host, 'date': date,
         'results': [{'model': arch, 'batch': batch, 'device': device, 'rows': rows}
                     for (arch, batch, device), rows in results.items()]}, indent=1) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--batches', default='1,16')
    parser.add_argument('--extra', default='resnet50:8', help='more model:batch pairs')
    parser.add_argument('--devices', default='cpu,cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder for the tables')
    parser.add_argument('--tag', default='speed-interleaved', help='file name of the tables (without extension)')
    args = parser.parse_args(argv)
    configs = [(arch, int(batch)) for arch in args.models.split(',') for batch in args.batches.split(',')]
    configs += [(pair.split(':')[0], int(pair.split(':')[1])) for pair in args.extra.split(',') if pair]
    results = {}
    for device in args.devices.split(','):
        for arch, batch in tqdm(configs, desc=f'speed, round-robin ({device})'):
            results[(arch, batch, device)] = measure(arch, batch, torch.device(device), args.repeats,
                                                     args.input_size)
    write_report(results, command_line(argv), args)
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
