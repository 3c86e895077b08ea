'''BatchNorm coverage and exactness across torchvision classifiers, against torch.fx and Zennit.

For each model (weights=None, BatchNorm statistics randomised, float32) this counts the BatchNorms, how many
``torch.fx.experimental.optimization.fuse``, Zennit's ``SequentialMergeBatchNorm`` and this package fold, the max
relative logit error of each, and whether Zennit's merge changed the outputs or left the model changed. It writes
``benchmarks/results/zoo.md`` and ``zoo.json`` with the command, machine and date.

    python benchmarks/zoo.py
'''
import argparse
import json
from pathlib import Path

import torch
import torchvision
from torch.fx.experimental.optimization import fuse as fx_fuse
from tqdm.auto import tqdm
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.core import Composite

from zennit_bnfuse import fuse
from zennit_bnfuse.fold import is_batch_norm

from provenance import command_line, header, machine, today

RESULTS = Path(__file__).parent / 'results'
MODELS = ('vgg11_bn', 'vgg16_bn', 'resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'densenet121',
          'mobilenet_v2', 'mobilenet_v3_small', 'efficientnet_b0', 'efficientnet_v2_s', 'mnasnet1_0', 'inception_v3')


def randomized(arch, seed=0):
    '''torchvision model ``arch`` with weights=None and random BatchNorm statistics, in eval mode.'''
    torch.manual_seed(seed)
    kwargs = {'init_weights': True} if arch == 'inception_v3' else {}
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if is_batch_norm(module):
                channels = module.running_mean.shape
                module.running_mean.copy_(torch.rand(channels, generator=generator) - .5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + .5)
                module.weight.copy_(torch.rand(channels, generator=generator) + .5)
                module.bias.copy_(torch.rand(channels, generator=generator) - .5)
    return model.eval()


def called_batch_norms(graph_module):
    '''How many BatchNorm calls a traced module's graph makes.'''
    return sum(node.op == 'call_module' and is_batch_norm(graph_module.get_submodule(node.target))
               for node in graph_module.graph.nodes)


def relative_error(actual, expected):
    '''Max absolute difference over the max absolute expected logit.'''
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def state_of(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def same_state(model, state):
    current = model.state_dict()
    return list(current) == list(state) and all(
        current[key].shape == value.shape and torch.equal(current[key], value) for key, value in state.items())


def measure(arch, input_size):
    '''One row of the table.'''
    model = randomized(arch)
    size = 299 if arch == 'inception_v3' else input_size
    input = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input)
    total = sum(is_batch_norm(module) for module in model.modules())
    row = {'model': arch, 'batch_norms': total, 'called': called_batch_norms(torch.fx.symbolic_trace(model))}

    fx_model = fx_fuse(model)
    with torch.no_grad():
        row['fx_error'] = relative_error(fx_model(input), expected)
    row['fx_folded'] = row['called'] - called_batch_norms(fx_model)

    state = state_of(model)
    canonizer = SequentialMergeBatchNorm()
    composite = Composite(canonizers=[canonizer])
    try:
        with composite.context(model), torch.no_grad():
            row['zennit_folded'] = len(composite.handles)
            row['zennit_error'] = relative_error(model(input), expected)
        row['zennit_raised'] = None
    except Exception as error:  # Zennit raises inside __enter__ on some models
        row['zennit_folded'] = None
        row['zennit_error'] = None
        row['zennit_raised'] = f'{type(error).__name__}: {str(error).splitlines()[0][:80]}'
    row['zennit_restored'] = same_state(model, state)
    if not row['zennit_restored']:
        model = randomized(arch)

    fused, report = fuse(model)
    with torch.no_grad():
        row['ours_error'] = relative_error(fused(input), expected)
    row['ours_folded'] = len(report.fused)
    row['ours_through_relu'] = sum(item.side == 'before-relu' for item in report.fused)
    row['ours_unfused'] = [{'bn': item.bn, 'reason': item.reason} for item in report.unfused]
    return row


def format_error(value):
    return '-' if value is None else f'{value:.1e}'


def write_report(rows, command, input_size):
    host = machine(f'torchvision {torchvision.__version__}')
    date = today()
    lines = header('BatchNorm coverage and exactness across torchvision', command, host, date) + [
        f'- models: weights=None, BatchNorm statistics and affine parameters randomised (seed 0), float32, '
        f'input 2x3x{input_size}x{input_size} (inception_v3: 299x299)',
        '- error: max |fused - original| / max |original| over the logits; for Zennit, measured inside its '
        'canonizer context',
        '- called: BatchNorms the eval-mode forward calls (torch.fx fuse counts among these: its GraphModule drops '
        'modules the forward never calls)',
        '- Zennit changed outputs: its error above 1e-5; Zennit restored: whether the state_dict after leaving '
        'Zennit\'s context equals the one before',
        '',
        '| model | BNs | called | torch.fx fuse | fx error | Zennit SequentialMergeBatchNorm | Zennit error | '
        'Zennit changed outputs | Zennit restored | zennit_bnfuse | of which BN→ReLU→layer | zennit_bnfuse error |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for row in rows:
        zennit = row['zennit_folded'] if row['zennit_raised'] is None else f'raised {row["zennit_raised"]}'
        changed = '-' if row['zennit_error'] is None else 'yes' if row['zennit_error'] > 1e-5 else 'no'
        lines.append(
            f'| {row["model"]} | {row["batch_norms"]} | {row["called"]} | {row["fx_folded"]} | '
            f'{format_error(row["fx_error"])} | {zennit} | {format_error(row["zennit_error"])} | {changed} | '
            f'{"yes" if row["zennit_restored"] else "**no**"} | '
            f'{row["ours_folded"]} | {row["ours_through_relu"]} | {format_error(row["ours_error"])} |')
    unfused = [(row['model'], item) for row in rows for item in row['ours_unfused']]
    lines += ['', '## BatchNorms zennit_bnfuse left in place', '']
    if unfused:
        lines += ['| model | BatchNorm | reason |', '| --- | --- | --- |']
        lines += [f'| {model} | {item["bn"]} | {item["reason"]} |' for model, item in unfused]
    else:
        lines.append('None: every BatchNorm of every listed model was folded.')
    worst = max(row['ours_error'] for row in rows)
    lines += ['', f'Largest zennit_bnfuse error over all models: {worst:.1e} (goal: below 1e-5).', '']
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'zoo.md').write_text('\n'.join(lines))
    (RESULTS / 'zoo.json').write_text(json.dumps({'command': command, 'machine': host, 'date': date,
                                                  'rows': rows}, indent=1) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--input-size', type=int, default=224)
    args = parser.parse_args(argv)
    rows = [measure(arch, args.input_size) for arch in tqdm(args.models.split(','), desc='zoo')]
    write_report(rows, command_line(argv), args.input_size)
    print((RESULTS / 'zoo.md').read_text())


if __name__ == '__main__':
    main()
