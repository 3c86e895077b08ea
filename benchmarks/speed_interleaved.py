'''LRP's engines against the plain gradient and the least exact z+ can cost, timed round-robin.

``speed.py`` times one method after another, so a machine whose speed drifts over minutes (a shared virtual machine)
moves its ratios. Here every repeat times each method once, in turn, and the table gives the median over repeats of
each method's time divided by the plain gradient's time in the same repeat. Methods:

- the floors: the plain input gradient of the fused model plus one more forward pass (the least an exact z+ can cost
  where every layer's input is non-negative: each layer's output under positive weights is needed besides its own),
  and two gradients plus one more forward (where z+ runs both halves, as on layers with signed inputs);
- ``CompositeLRP`` with EpsilonPlusFlat on its default engine (SinglePass) and on Zennit's hooks, and with
  LRP-epsilon (the rules Captum's defaults correspond to);
- ``FusedLRP`` (Captum's rules, EpsilonRule by default) on its default single-pass engine and on Captum's hooks;
- SinglePass as a Zennit composite with the FuseBatchNorm canonizer, entering and leaving its attributor context
  per call (canonizer apply + remove included, as for a user who makes one call per context).

Each call's minor page faults are counted beside its times: memory the C library's allocator handed back to the
system and asked for again is faulted in (and zeroed) page by page, which LRP, keeping more tensors than a gradient,
can pay more of (see ``allocators.sh``).

Writes ``benchmarks/results/speed-interleaved.md`` and ``.json``.

    python benchmarks/speed_interleaved.py
'''
import os
import resource
import statistics
import time

import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, SinglePass, keep_freed_memory
from zennit_bnfuse.evaluation.composites import epsilon

from provenance import ALLOCATOR_VARIABLES, command_line, header, machine, today
from speed import (
    MODELS, gradient_and_forward, input_gradient, parse_arguments, run_configurations, setup, synchronize,
    write_tables,
)

# timm models whose BatchNorms fuse() folds with timm 1.0 (plain BatchNorm2d, no norm-act layers)
TIMM_MODELS = ('timm/resnet26d', 'timm/dla34')
GRADIENT = 'gradient (fused model)'
FLOOR = 'gradient + one more forward (floor of exact z+)'
TWO_HALVES_FLOOR = 'two gradients + one more forward (floor of z+ with both halves)'
COMPOSITE_LRP = 'CompositeLRP(EpsilonPlusFlat), default engine'
COMPOSITE_LRP_REGISTERING = 'CompositeLRP(EpsilonPlusFlat), default engine, composite registered per call'
COMPOSITE_LRP_ZENNIT = 'CompositeLRP(EpsilonPlusFlat, engine=\'zennit\')'
COMPOSITE_LRP_EPSILON = 'CompositeLRP(LRP-epsilon), default engine'
FUSED_LRP = 'FusedLRP(), default engine'
FUSED_LRP_CAPTUM = 'FusedLRP(engine=\'captum\')'
SINGLE_PASS_COMPOSITE = 'SinglePass(EpsilonPlusFlat + FuseBatchNorm) in a Zennit context'


def attribution(lrp, input, target):
    '''One call of a Captum-style attribution object.'''
    return lambda: lrp.attribute(input, target=target)


def registering_per_call(lrp, input, target):
    '''One call of ``lrp`` (a CompositeLRP) with its composite registered for that call only, as it was before the
    composite stayed registered on the prepared copy between calls (see zennit_bnfuse.registration).'''
    def run():
        try:
            return lrp.attribute(input, target=target)
        finally:
            lrp.registration.remove()
    return run


def lrp_call(model, composite, input, target):
    '''One attribution: enter the composite's context, attribute, leave.'''
    def run():
        with Gradient(model, composite) as attributor:
            return attributor(input, torch.nn.functional.one_hot(target, 1000).to(input))[1]
    return run


def two_gradients_and_forward(fused, input, target):
    '''Two input gradients of ``fused`` and one more forward pass: what z+ costs at least where it runs both
    halves on every layer.'''
    floor, gradient = gradient_and_forward(fused, input, target), input_gradient(fused, input, target)

    def run():
        gradient()
        return floor()
    return run


# option name -> (row name, function (model, fused model, input, target) -> the timed function)
METHODS = {
    'floor': (FLOOR, lambda model, fused, input, target: gradient_and_forward(fused, input, target)),
    'two-halves-floor': (TWO_HALVES_FLOOR, lambda model, fused, input, target: two_gradients_and_forward(
        fused, input, target)),
    'composite': (COMPOSITE_LRP, lambda model, fused, input, target: attribution(
        CompositeLRP(model, EpsilonPlusFlat()), input, target)),
    'composite-registering': (COMPOSITE_LRP_REGISTERING, lambda model, fused, input, target: registering_per_call(
        CompositeLRP(model, EpsilonPlusFlat()), input, target)),
    'composite-zennit': (COMPOSITE_LRP_ZENNIT, lambda model, fused, input, target: attribution(
        CompositeLRP(model, EpsilonPlusFlat(), engine='zennit'), input, target)),
    'composite-epsilon': (COMPOSITE_LRP_EPSILON, lambda model, fused, input, target: attribution(
        CompositeLRP(model, epsilon()), input, target)),
    'fused': (FUSED_LRP, lambda model, fused, input, target: attribution(FusedLRP(model), input, target)),
    'fused-captum': (FUSED_LRP_CAPTUM, lambda model, fused, input, target: attribution(
        FusedLRP(model, engine='captum'), input, target)),
    'singlepass-composite': (SINGLE_PASS_COMPOSITE, lambda model, fused, input, target: lrp_call(
        model, SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()])), input, target)),
}
# targets: (method, reference, at most (None: a comparison without a target), models (None: all))
TARGETS = (
    (COMPOSITE_LRP, FLOOR, 1.15, ('resnet50', 'vgg16_bn', 'densenet121')),
    (COMPOSITE_LRP, TWO_HALVES_FLOOR, 1.15, ('mobilenet_v2', 'efficientnet_b0')),
    (FUSED_LRP, COMPOSITE_LRP_EPSILON, 1.3, None),
    # no target: what keeping the composite registered between calls saves (when both were timed)
    (COMPOSITE_LRP_REGISTERING, COMPOSITE_LRP, None, None),
)


def measure(arch, batch, device, repeats, input_size, methods=tuple(METHODS)):
    '''Per-repeat times and ratios to the plain gradient of the fused model, for each method.'''
    model, fused, input, target = setup(arch, batch, device, input_size)
    functions = {GRADIENT: input_gradient(fused, input, target)}
    for key in methods:
        name, make = METHODS[key]
        functions[name] = make(model, fused, input, target)
    seconds = {name: [] for name in functions}
    cpu_seconds = {name: [] for name in functions}
    faults = {name: [] for name in functions}
    for function in functions.values():  # warm-up (and the prepared copies are built)
        function()
    synchronize(device)
    for _ in range(repeats):
        for name, function in functions.items():
            start, cpu_start, faults_start = time.perf_counter(), time.process_time(), minor_page_faults()
            function()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
            faults[name].append(minor_page_faults() - faults_start)
    return {name: {'seconds': values, 'cpu_seconds': cpu_seconds[name], 'minor_page_faults': faults[name],
                   'median_ratio': median_ratio(values, seconds[GRADIENT]),
                   'median_cpu_ratio': median_ratio(cpu_seconds[name], cpu_seconds[GRADIENT])}
            for name, values in seconds.items()}


def minor_page_faults():
    '''The minor page faults of this process so far: each first write to a page the allocator got from the system
    (freshly mapped, or handed back and asked for again) is one.'''
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_ratio(values, references):
    '''The median over repeats of ``value / reference`` in the same repeat.'''
    return statistics.median(value / reference for value, reference in zip(values, references))


def per_repeat_ratio(rows, name, reference, clock='seconds'):
    '''The median over repeats of ``name``'s time / ``reference``'s time in the same repeat, by wall-clock
    (``'seconds'``) or process CPU time (``'cpu_seconds'``); None if either method is missing.'''
    if name not in rows or reference not in rows:
        return None
    return median_ratio(rows[name][clock], rows[reference][clock])


def write_report(results, command, args):
    host = machine(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
    date = today()
    names = [name for name, _ in METHODS.values() if any(name in rows for rows in results.values())]
    lines = header('LRP speed, timed round-robin', command, host, date) + [
        f'- input {args.input_size}x{args.input_size}; {args.repeats} repeats after one warm-up, each timing every '
        'method once in turn; a cell is the median over repeats of the method\'s time / the plain input gradient '
        'of the fused model in the same repeat (the last column is that gradient\'s median time)',
        '- floors: EpsilonPlusFlat puts z+ on every conv but the first; z+ needs each layer\'s output under '
        'positive weights besides its own, so at least one more forward pass than a gradient; where a layer\'s '
        'input can be negative (mobilenet_v2\'s linear bottlenecks, efficientnet\'s SiLU) z+ runs both halves, '
        'one more forward and backward of that layer (the two-halves floor counts it for every layer)',
        '- CompositeLRP and FusedLRP build their prepared copy in the warm-up; "default engine" is SinglePass for '
        'CompositeLRP and the single-pass Captum engine for FusedLRP',
        '- each call is timed by the wall clock and by the process\'s CPU time (which leaves out the time other '
        'processes on a shared machine hold the CPU); the first table is wall-clock, the second CPU time',
        '- memory allocator: ' + ('the settings in the command' if args.keep_freed_memory or any(
            os.environ.get(name) for name in ALLOCATOR_VARIABLES) else 'the C library\'s malloc with its defaults; '
            'where it hands freed memory back to the system, the next call faults it in again, page by page, and '
            'LRP, which keeps more tensors than a gradient, pays more of that (docs/howto/singlepass.md, "Speed")'),
        '',
    ]
    for clock, ratio_key, title in (('seconds', 'median_ratio', 'Wall clock'),
                                    ('cpu_seconds', 'median_cpu_ratio', 'Process CPU time')):
        lines += [f'## {title}: time / plain gradient', '',
                  '| model | batch | device | ' + ' | '.join(names) + ' | gradient (fused model) |',
                  '| --- | --- | --- | ' + ' | '.join('---' for _ in names) + ' | --- |']
        for (arch, batch, device), rows in results.items():
            gradient = statistics.median(rows[GRADIENT][clock])
            lines.append(f'| {arch} | {batch} | {device} | '
                         + ' | '.join(f'{rows[name][ratio_key]:.2f}' if name in rows else '-' for name in names)
                         + f' | {1000 * gradient:.1f} ms |')
        lines.append('')
    lines += ['## Minor page faults per call', '', 'The median over repeats: pages the call touched for the first time '
              'since the allocator got them from the system (zeroed by the kernel on the way; a call that reuses '
              'memory the allocator kept has none).', '',
              '| model | batch | device | ' + ' | '.join(names) + ' | gradient (fused model) |',
              '| --- | --- | --- | ' + ' | '.join('---' for _ in names) + ' | --- |']
    for (arch, batch, device), rows in results.items():
        lines.append(f'| {arch} | {batch} | {device} | ' + ' | '.join(
            f'{statistics.median(rows[name]["minor_page_faults"]):,.0f}' if name in rows else '-'
            for name in (*names, GRADIENT)) + ' |')
    lines += ['', '## Targets', '', 'Median over repeats of the ratio of the two methods\' times in the same repeat, '
              'by the wall clock and by process CPU time (rows without a target compare two methods).', '',
              '| model | batch | device | method | reference | ratio (wall) | ratio (CPU) | target | met (wall) |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for (arch, batch, device), rows in results.items():
        for name, reference, most, models in TARGETS:
            ratio = per_repeat_ratio(rows, name, reference)
            if ratio is None or (models is not None and arch not in models):
                continue
            cpu = per_repeat_ratio(rows, name, reference, 'cpu_seconds')
            target, met = ('-', '-') if most is None else (f'≤ {most}', 'yes' if ratio <= most else 'no')
            lines.append(f'| {arch} | {batch} | {device} | {name} | {reference} | {ratio:.2f} | {cpu:.2f} | '
                         f'{target} | {met} |')
    lines.append('')
    write_tables(lines, results, command, host, date, args)


def main(argv=None):
    args = parse_arguments(argv, repeats=5, tag='speed-interleaved', doc=__doc__, methods=METHODS,
                           models=MODELS + TIMM_MODELS, batches='1,8,16', extra='', keep_memory=True)
    if args.keep_freed_memory:
        keep_freed_memory()
    methods = tuple(args.methods.split(','))
    command = command_line(argv)
    run_configurations(args, lambda *config: measure(*config, methods=methods),
                       after_each=lambda results: write_report(results, command, args))
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
