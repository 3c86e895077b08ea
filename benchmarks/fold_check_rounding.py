'''How much an exact fold's rounding moves a model's output, against what the output is computed from.

``fuse(model, example_inputs=...)`` keeps a fold only where the fused copy gives the model's output on the example
inputs (``zennit_bnfuse.verification``). Each output value is compared on its own scale: the larger of its magnitude
and ``ROUNDING_ALLOWANCE`` float64 epsilons of how much it depends on the values it is computed from (measured by
perturbing every leaf module's output), at most the tensor's largest value. This measures, for exact folds (every
fold torch.fx finds in a traced torchvision model, BatchNorm statistics randomised), in float64:

- ``epsilons``: the most any output value the magnitude criterion alone does not cover (1.5e-8 of the value) moved,
  in float64 epsilons of its dependence; ``ROUNDING_ALLOWANCE`` must lie well above it;
- ``kept``: whether the check keeps the exact folds, and else its reason.

Heads: the logits, log-softmax, L2-normalised and centred logits, and a Siamese difference of the logits of a pair of
near-duplicate images (the second the first plus relative noise ``d``): on the nearest pairs that one cancels, and
the check refuses the folds there with the reason that it does.

    python benchmarks/fold_check_rounding.py                      # six models (about 3 minutes on one CPU thread)
'''
import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from zennit_bnfuse import find_fusable_pairs
from zennit_bnfuse.replacements import replaced_copy, replacement_modules
from zennit_bnfuse.verification import PERTURBATION, ROUNDING_ALLOWANCE, FoldCheck, output_tolerance

from provenance import command_line, header, machine, today
from zoo import randomize_statistics

RESULTS = Path(__file__).parent / 'results'
MODELS = ('resnet18', 'vgg11_bn', 'mobilenet_v3_small', 'resnet50', 'densenet121', 'efficientnet_b0')
HEADS = ('logits', 'log_softmax', 'normalize', 'centered', 'siamese')
# (batch, input scale, relative distance of the Siamese pair)
INPUTS = ((1, 1., 1e-9), (2, 1e-6, 1e-12), (4, 1., 1e-6))


class Head(torch.nn.Module):
    '''A classifier with one of :py:data:`HEADS` on its logits.'''
    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == 'log_softmax':
            return F.log_softmax(logits * 10, 1)
        if self.kind == 'normalize':
            return F.normalize(logits, dim=1)
        if self.kind == 'centered':
            return logits - logits.mean(1, keepdim=True)
        if self.kind == 'siamese':
            first, second = logits.chunk(2)
            return first - second
        return logits


def example(kind, batch, scale, distance):
    '''The input for a head: ``batch`` images (pairs for the Siamese head), seed ``batch``.'''
    generator = torch.Generator().manual_seed(batch)
    images = scale * torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    if kind != 'siamese':
        return images
    noise = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    return torch.cat([images, images + images.abs() * distance * noise])


def measure(model, input):
    '''``(epsilons, folds, kept)`` for the exact folds of ``model`` on ``input`` (see the module docstring; ``folds``
    is how many there are).'''
    report = find_fusable_pairs(model)
    check = FoldCheck(model, input)
    expected, dependence = check.expected, check.scales[0].dependence
    fused = check.run(replaced_copy(check.model, replacement_modules(check.model, report)))
    error = (fused - expected).abs()
    uncovered = error > output_tolerance(torch.float64) * expected.abs()
    eps = torch.finfo(torch.float64).eps
    epsilons = (error / (eps * dependence))[uncovered].max().item() if uncovered.any() else 0.
    problem = check.problem(report.fused)
    return epsilons, len(report.fused), 'yes' if problem is None else f'no: {problem}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS), help='torchvision model names, comma-separated')
    parser.add_argument('--heads', default=','.join(HEADS), help=f'of {", ".join(HEADS)}')
    parser.add_argument('--results', type=Path, default=RESULTS, help='folder for the .md and .json tables')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    runs = [(name, kind, setting) for name in args.models.split(',') for kind in args.heads.split(',')
            for setting in INPUTS]
    nets = {}
    for name, kind, (batch, scale, distance) in tqdm(runs, desc='folds checked'):
        if name not in nets:
            torch.manual_seed(0)
            nets[name] = randomize_statistics(getattr(torchvision.models, name)(weights=None, num_classes=10),
                                              seed=1).double().eval()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            epsilons, folds, kept = measure(Head(nets[name], kind).eval(), example(kind, batch, scale, distance))
        rows.append({'model': name, 'head': kind, 'batch': batch, 'input scale': scale,
                     'pair distance': distance if kind == 'siamese' else None, 'folds': folds,
                     'epsilons': epsilons, 'kept': kept})
    most = max(row['epsilons'] for row in rows)
    date, command, description = today(), command_line(argv), machine()
    lines = header('Exact folds and the fold check\'s rounding allowance', command, description, date) + [
        '- models: torchvision, weights=None, 10 classes, BatchNorm statistics randomised (seed 1), 32x32 inputs, '
        'float64; every fold torch.fx finds (exact by construction)',
        '- epsilons: the most an output value not covered by 1.5e-8 of its own magnitude moved under the folds, in '
        'float64 epsilons of how much it depends on what it is computed from (every leaf module\'s output perturbed by '
        f'{PERTURBATION:g} of its largest value where it sums its input, a conv, linear or BatchNorm, else of each '
        f'value); the check allows {ROUNDING_ALLOWANCE:g}',
        '- kept: whether the check on these inputs keeps the exact folds (a Siamese difference of a near-duplicate '
        'pair cancels: refused, with the reason that it does)',
        '', f'Most epsilons over all rows: {most:.3g} (allowance {ROUNDING_ALLOWANCE:g}, '
        f'{ROUNDING_ALLOWANCE / most:.0f}x above it).' if most else 'No value needed the allowance.', '',
        '| model | head | batch | input scale | pair distance | folds | epsilons | kept |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        distance = '' if row['pair distance'] is None else f'{row["pair distance"]:g}'
        kept = row['kept'] if len(row['kept']) < 140 else row['kept'][:137] + '...'
        lines.append(f'| {row["model"]} | {row["head"]} | {row["batch"]} | {row["input scale"]:g} | {distance} | '
                     f'{row["folds"]} | {row["epsilons"]:.3g} | {kept} |')
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / 'fold-check-rounding.md').write_text('\n'.join(lines) + '\n')
    (args.results / 'fold-check-rounding.json').write_text(json.dumps(
        {'command': command, 'machine': description, 'date': date, 'allowance': ROUNDING_ALLOWANCE, 'rows': rows},
        indent=1))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
