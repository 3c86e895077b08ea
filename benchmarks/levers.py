'''Two levers for z+ on convolutions, measured layer by layer: one convolution with the weights ``[W; W+]`` stacked,
and ``torch.compile`` of the elementwise tail.

SinglePass computes z+ on a convolution whose input cannot be negative (after a ReLU) as: the layer's own output
``conv(x, W) + b`` in the forward pass; in the backward step ``z+ = conv(x, W+) + b+``, ``g / (z+ + epsilon)`` (in
place, two passes), the input gradient of that (``aten.convolution_backward``) and its product with ``x``. For every
plain convolution of the fused model whose input has no negative entry (the first convolution, on the image, is
left out: EpsilonPlusFlat gives it the flat rule), with the layer's real input from one forward pass of random images
and a random relevance of its output, each repeat times, in turn and summed over the layers:

- the two convolutions as today (``W``, then ``W+``) against one convolution with ``[W; W+]`` stacked along the
  output channels (its two halves are views);
- the tail as today (``add_``, then ``torch.div(..., out=)``) against ``torch.compile`` of ``g / (z+ + epsilon)`` (one
  pass; compiled for any shape (``dynamic=True``), outside the timing, its compile time given apart).

A cell is the median over repeats of the lever's time divided by today's in the same repeat. The table also says
whether the lever gives the same bits as today's code (SinglePass's relevance equals Zennit's bit for bit).

    python benchmarks/levers.py
'''
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zennit_bnfuse.singlepass import is_plain_convolution

from provenance import command_line, header, machine, today
from speed import RESULTS, setup, write_tables

EPSILON = 1e-6


def convolution(module, input, weight, bias):
    '''``module``'s convolution of ``input`` with ``weight`` and ``bias`` (its stride, padding, dilation).'''
    return F.conv2d(input, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def layer_inputs(model, input):
    '''The plain 2d convolutions of ``model`` (see :py:func:`~zennit_bnfuse.singlepass.is_plain_convolution`; one
    group) with the input each gets from ``input``, for those whose input has no negative entry, but not those that
    read ``input`` itself (EpsilonPlusFlat gives the first layer the flat rule).'''
    inputs, handles = {}, []

    def keep_input(module, args):
        if args[0] is not input:
            inputs.setdefault(module, args[0].detach().clone())
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and is_plain_convolution(module) and module.groups == 1:
            handles.append(module.register_forward_pre_hook(keep_input))
    with torch.no_grad():
        model(input)
    for handle in handles:
        handle.remove()
    return [(module, x) for module, x in inputs.items() if x.min() >= 0]


class Layer:
    '''One convolution: its input, weights ``W``, ``W+`` and the stack of both, a random relevance of its output.'''
    def __init__(self, module, input, generator):
        self.module, self.input = module, input
        self.weight = module.weight.detach()
        self.bias = torch.zeros(self.weight.shape[0]) if module.bias is None else module.bias.detach()
        self.weight_plus, self.bias_plus = self.weight.clamp(min=0), self.bias.clamp(min=0)
        self.stacked_weight = torch.cat([self.weight, self.weight_plus])
        self.stacked_bias = torch.cat([self.bias, self.bias_plus])
        with torch.no_grad():
            self.z_plus = convolution(module, input, self.weight_plus, self.bias_plus)
        self.grad = torch.rand(self.z_plus.shape, generator=generator)
        self.buffer = torch.empty_like(self.z_plus)  # stands for the z+ that today's tail overwrites

    def separate(self):
        with torch.no_grad():
            return (convolution(self.module, self.input, self.weight, self.bias),
                    convolution(self.module, self.input, self.weight_plus, self.bias_plus))

    def stacked(self):
        with torch.no_grad():
            both = convolution(self.module, self.input, self.stacked_weight, self.stacked_bias)
        return both.split(self.weight.shape[0], dim=1)

    def eager_tail(self):
        '''Today's tail: ``z+ + epsilon`` and the quotient, each a pass into the memory that holds z+ (here a buffer,
        so that z+ stays for the next repeat).'''
        return torch.div(self.grad, torch.add(self.z_plus, EPSILON, out=self.buffer), out=self.buffer)


def tail(grad, z_plus):
    return grad / (z_plus + EPSILON)


def measure(arch, batch, repeats, input_size):
    '''Per-repeat times of the four variants summed over the layers, whether the levers give today's bits, and the
    compile time.'''
    model, fused, input, _ = setup(arch, batch, 'cpu', input_size)
    generator = torch.Generator().manual_seed(1)
    layers = [Layer(module, x, generator) for module, x in layer_inputs(fused, input)]
    compiled = torch.compile(tail, dynamic=True)  # one kernel for every layer's shape, as a library would need
    start = time.perf_counter()
    for layer in layers:
        compiled(layer.grad, layer.z_plus)
    compile_seconds = time.perf_counter() - start
    same = {
        'stacked': all(torch.equal(a, b) for layer in layers for a, b in zip(layer.separate(), layer.stacked())),
        'compiled': all(torch.equal(layer.eager_tail(), compiled(layer.grad, layer.z_plus))
                        for layer in layers),
    }
    variants = {
        'separate': lambda layer: layer.separate(),
        'stacked': lambda layer: layer.stacked(),
        'eager tail': lambda layer: layer.eager_tail(),
        'compiled tail': lambda layer: compiled(layer.grad, layer.z_plus),
    }
    times = {name: [] for name in variants}
    for _ in tqdm(range(repeats + 1), desc=f'{arch} batch {batch}', leave=False):
        for name, run in variants.items():
            seconds = 0.0
            for layer in layers:
                start = time.perf_counter()
                run(layer)
                seconds += time.perf_counter() - start
            times[name].append(seconds)
    times = {name: values[1:] for name, values in times.items()}  # the first repeat warms up
    return {'layers': len(layers), 'seconds': times, 'same_bits': same, 'compile_seconds': compile_seconds}


def median_ratio(numerator, denominator):
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='resnet50')
    parser.add_argument('--batches', default='1,16')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS)
    parser.add_argument('--tag', default='levers')
    args = parser.parse_args(argv)
    results = {(arch, int(batch), 'cpu'): measure(arch, int(batch), args.repeats, args.input_size)
               for arch in args.models.split(',') for batch in args.batches.split(',')}
    host, date = machine('no GPU' if not torch.cuda.is_available() else torch.cuda.get_device_name()), today()
    lines = header('Levers for z+ on convolutions', command_line(argv), host, date) + [
        f'- input {args.input_size}x{args.input_size}; {args.repeats} repeats after one warm-up; each repeat times '
        'every variant in turn, summed over the convolutions whose input has no negative entry; a ratio is the median '
        'over repeats of the lever\'s time / today\'s in the same repeat',
        '- the compiled tail returns a new tensor; today\'s writes into z+, which is new in each backward step',
        '',
        '| model | batch | layers | W, then W+ | [W; W+] stacked | ratio | eager tail | compiled tail | ratio | '
        'same bits: stacked, compiled | compile time |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for (arch, batch, _), result in results.items():
        seconds = result['seconds']
        same = result['same_bits']

        def ms(name):
            return f'{1000 * statistics.median(seconds[name]):.1f} ms'
        lines.append(
            f'| {arch} | {batch} | {result["layers"]} | {ms("separate")} | {ms("stacked")} | '
            f'{median_ratio(seconds["stacked"], seconds["separate"]):.2f} | {ms("eager tail")} | '
            f'{ms("compiled tail")} | {median_ratio(seconds["compiled tail"], seconds["eager tail"]):.2f} | '
            f'{"yes" if same["stacked"] else "no"}, {"yes" if same["compiled"] else "no"} | '
            f'{result["compile_seconds"]:.1f} s |')
    lines.append('')
    write_tables(lines, results, command_line(argv), host, date, args)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
