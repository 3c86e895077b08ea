'''LRP with SinglePass against Zennit's hooks, the plain gradient and the least exact z+ can cost, timed round-robin.

``speed.py`` times one method after another, so a machine whose speed drifts over minutes (a shared virtual machine)
moves its ratios. Here every repeat times each method once, in turn, and the table gives the median over repeats of
each method's time divided by the plain gradient's time in the same repeat. Each LRP call enters and leaves its
Zennit attributor context (canonizer apply + remove included, as for a user who makes one call per context).
Writes ``benchmarks/results/speed-interleaved.md`` and ``.json``.

    python benchmarks/speed_interleaved.py
'''
import statistics
import time

import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import FuseBatchNorm, SinglePass
from zennit_bnfuse.evaluation.composites import epsilon

from provenance import command_line, header, machine, today
from speed import (
    gradient_and_forward, input_gradient, parse_arguments, run_configurations, setup, synchronize, write_tables,
)

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
    model, fused, input, target = setup(arch, batch, device, input_size)
    gradient = input_gradient(fused, input, target)
    functions = {'gradient (fused model)': gradient}
    for name, make_composite in METHODS.items():
        functions[name] = gradient_and_forward(fused, input, target) if make_composite is None else lrp_call(
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
    write_tables(lines, results, command, host, date, args)


def main(argv=None):
    args = parse_arguments(argv, repeats=5, tag='speed-interleaved', doc=__doc__)
    write_report(run_configurations(args, measure), command_line(argv), args)
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
