'''BatchNorm coverage and exactness across torchvision and timm classifiers, against torch.fx and Zennit.

For each model (weights=None / pretrained=False, BatchNorm statistics randomised) this counts the BatchNorms, how
many the eval-mode forward calls, how many ``torch.fx.experimental.optimization.fuse``, Zennit's
``SequentialMergeBatchNorm`` and this package fold, the max relative logit error of each in float32 and float64, and
whether Zennit's merge left the model changed; it lists every BatchNorm this package leaves in place with the reason.
It writes ``benchmarks/results/zoo.md`` and ``zoo.json`` with the command, machine and date.

    python benchmarks/zoo.py                      # both tables
    python benchmarks/zoo.py --suites timm        # only timm (needs ``pip install timm``)
'''
import argparse
import copy
import json
import time
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
TORCHVISION_MODELS = (
    'vgg11_bn', 'vgg16_bn', 'resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'densenet121',
    'mobilenet_v2', 'mobilenet_v3_small', 'efficientnet_b0', 'efficientnet_v2_s', 'mnasnet1_0', 'inception_v3',
)
# the smallest variant of each family; what each one adds for the fusion engine
TIMM_MODELS = {
    'resnet18': 'ResNet: conv -> BN',
    'resnet26d': 'ResNet-D: avg-pool shortcut',
    'seresnext26d_32x4d': 'SE-ResNeXt-D: grouped convs, squeeze-excitation',
    'resnetv2_50': 'pre-activation ResNetV2: BatchNormAct2d before the convs, shared by conv1 and the shortcut',
    'res2net50_14w_8s': 'Res2Net: split/cat inside the block',
    'resnest14d': 'ResNeSt: split attention',
    'skresnet18': 'SKNet: selective kernels',
    'efficientnet_b0': 'EfficientNet: BatchNormAct2d (SiLU), SE',
    'tf_efficientnet_b0': 'EfficientNet (TF port): Conv2dSame, dynamic padding',
    'efficientnet_cc_b0_4e': 'EfficientNet-CondConv: CondConv2d',
    'mixnet_s': 'MixNet: MixedConv2d (split, convs, cat)',
    'tf_mixnet_s': 'MixNet (TF port): MixedConv2d of Conv2dSame',
    'mobilenetv3_large_100': 'MobileNetV3: hard-swish, SE',
    'mobilenetv4_conv_small': 'MobileNetV4 (conv)',
    'lcnet_050': 'LCNet',
    'regnety_002': 'RegNetY',
    'cspresnet50': 'CSPNet: cross-stage partial (split/cat)',
    'cs3darknet_focus_s': 'CSPNet v3 (Darknet, focus stem)',
    'dla34': 'DLA: aggregation nodes (cat -> conv -> BN)',
    'dpn68': 'DPN: dual path, CatBnAct',
    'vovnet39a': 'VoVNet: one-shot aggregation (cat)',
    'ese_vovnet19b_dw': 'VoVNet-ESE, depthwise',
    'densenet121': 'DenseNet: BatchNormAct2d (ReLU) after a cat',
    'rexnet_100': 'ReXNet',
    'hrnet_w18_small': 'HRNet: multi-resolution fusion',
    'ghostnet_050': 'GhostNet: ghost modules (cat, slice)',
    'hgnetv2_b0': 'HGNetV2: learnable affine blocks',
    'xception41': 'Xception (timm): separable convs',
    'selecsls42b': 'SelecSLS',
    'repvgg_a0': 'RepVGG (train-time branches): identity BN',
    'mobileone_s0': 'MobileOne (train-time branches): identity BN',
    'repghostnet_050': 'RepGhostNet (train-time branches): identity BN',
    'mobilevit_xxs': 'MobileViT: transformer blocks timm marks untraceable',
    'efficientnetv2_rw_t': 'EfficientNetV2 (timm): random weights amplify float32 rounding',
}
SUITES = {'torchvision': TORCHVISION_MODELS, 'timm': tuple(TIMM_MODELS)}
INPUT_SIZES = {'torchvision': 224, 'timm': 64}


def build(suite, arch):
    '''Model ``arch`` of ``suite`` without pretrained weights, in eval mode.'''
    torch.manual_seed(0)
    if suite == 'timm':
        import timm
        return timm.create_model(arch, pretrained=False).eval()
    kwargs = {'init_weights': True} if arch == 'inception_v3' else {}
    return getattr(torchvision.models, arch)(weights=None, **kwargs).eval()


def randomized(suite, arch, seed=0):
    '''``build(suite, arch)`` with random BatchNorm statistics and affine parameters.'''
    return randomize_statistics(build(suite, arch), seed)


def randomize_statistics(model, seed=0):
    '''``model`` with random BatchNorm statistics and affine parameters (changed in place).'''
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if is_batch_norm(module):
                channels = module.running_mean.shape
                module.running_mean.copy_(torch.rand(channels, generator=generator) - .5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + .5)
                module.weight.copy_(torch.rand(channels, generator=generator) + .5)
                module.bias.copy_(torch.rand(channels, generator=generator) - .5)
    return model


def called_batch_norms(model, input):
    '''How many BatchNorm modules the forward of ``model`` on ``input`` calls, seen by forward hooks.'''
    called = set()
    handles = [module.register_forward_hook(lambda *_, name=name: called.add(name))
               for name, module in model.named_modules() if is_batch_norm(module)]
    try:
        with torch.no_grad():
            model(input)
    finally:
        for handle in handles:
            handle.remove()
    return len(called)


def batch_norms_in_graph(graph_module):
    '''How many BatchNorms a traced module's graph still computes: BatchNorm module calls and inlined
    ``F.batch_norm`` calls (timm's norm-act layers are traced through).'''
    return sum((node.op == 'call_module' and is_batch_norm(graph_module.get_submodule(node.target)))
               or (node.op == 'call_function' and node.target in (torch.nn.functional.batch_norm, torch.batch_norm))
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


def short_error(error):
    return f'{type(error).__name__}: {str(error).splitlines()[0][:80]}'


def measure_dtype(model, input, called):
    '''fx, Zennit and this package on ``model`` and ``input`` of one dtype; ``model`` is not changed.'''
    with torch.no_grad():
        expected = model(input)
    row = {}
    try:
        fx_model = fx_fuse(model)
        with torch.no_grad():
            row['fx_error'] = relative_error(fx_model(input), expected)
        row['fx_folded'] = called - batch_norms_in_graph(fx_model)
        row['fx_raised'] = None
    except Exception as error:  # fx raises many kinds of errors for untraceable code
        row.update(fx_error=None, fx_folded=None, fx_raised=short_error(error))

    work = copy.deepcopy(model)  # Zennit's merge can leave the model changed
    state = state_of(work)
    composite = Composite(canonizers=[SequentialMergeBatchNorm()])
    try:
        with composite.context(work), torch.no_grad():
            row['zennit_folded'] = len(composite.handles)
            row['zennit_error'] = relative_error(work(input), expected)
        row['zennit_raised'] = None
    except Exception as error:  # Zennit raises inside __enter__ on some models
        row.update(zennit_folded=None, zennit_error=None, zennit_raised=short_error(error))
    row['zennit_restored'] = same_state(work, state)

    fused, report = fuse(model)
    with torch.no_grad():
        row['ours_error'] = relative_error(fused(input), expected)
    row['report'] = report
    row['expected'] = expected
    return row


def measure(suite, arch, input_size):
    '''One row of the table: float32 and float64.'''
    start = time.perf_counter()
    model = randomized(suite, arch)
    size = 299 if arch == 'inception_v3' else input_size
    input = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    called = called_batch_norms(model, input)
    single = measure_dtype(model, input, called)
    double = measure_dtype(copy.deepcopy(model).double(), input.double(), called)
    report = single.pop('report')
    double.pop('report')
    noise = relative_error(single.pop('expected').double(), double.pop('expected'))
    row = {'model': arch, 'input_size': size, 'batch_norms': sum(is_batch_norm(module) for module in model.modules()),
           'called': called, 'float32_noise': noise, **single, **{f'{key}64': value for key, value in double.items()},
           'ours_folded': len(report.fused),
           'ours_through_relu': sum(item.side == 'before-relu' for item in report.fused),
           'ours_several_layers': sum(bool(item.also) for item in report.fused),
           'ours_unfused': [{'bn': item.bn, 'reason': item.reason} for item in report.unfused]}
    row['seconds'] = round(time.perf_counter() - start, 1)
    return row


def format_error(value):
    return '-' if value is None else f'{value:.1e}'


def errors(row, key):
    '''``float32 / float64`` errors of one method.'''
    return f'{format_error(row[key])} / {format_error(row[key + "64"])}'


def folded(row, key):
    '''What a method folded, or how it failed.'''
    raised = row[key.replace('folded', 'raised')]
    return f'raised {raised}' if raised is not None else str(row[key])


def table(suite, rows):
    '''The markdown lines of one suite's table and its list of BatchNorms left in place.'''
    descriptions = TIMM_MODELS if suite == 'timm' else {}
    lines = [
        '| model | BNs | called | torch.fx fuse | fx error f32 / f64 | Zennit SequentialMergeBatchNorm | '
        'Zennit error f32 / f64 | Zennit restored | zennit_bnfuse | of which BN→ReLU→layer | of which several '
        'layers | zennit_bnfuse error f32 / f64 | float32 model vs float64 |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for row in rows:
        name = row['model'] + (f' ({descriptions[row["model"]]})' if row['model'] in descriptions else '')
        restored = 'yes' if row['zennit_restored'] and row['zennit_restored64'] else '**no**'
        lines.append(
            f'| {name} | {row["batch_norms"]} | {row["called"]} | {folded(row, "fx_folded")} | '
            f'{errors(row, "fx_error")} | {folded(row, "zennit_folded")} | {errors(row, "zennit_error")} | '
            f'{restored} | {row["ours_folded"]} | {row["ours_through_relu"]} | {row["ours_several_layers"]} | '
            f'{errors(row, "ours_error")} | {format_error(row["float32_noise"])} |')
    total = sum(row['batch_norms'] for row in rows)
    ours = sum(row['ours_folded'] for row in rows)
    complete = sum(row['ours_folded'] == row['batch_norms'] for row in rows)
    # a float32 model whose own rounding is above the goal cannot be matched closer by any float32 fold
    noisy = [row for row in rows if row['float32_noise'] > 1e-5]
    clean = [row for row in rows if row['float32_noise'] <= 1e-5]
    worst = max((row['ours_error'] for row in clean), default=None)
    worst64 = max(row['ours_error64'] for row in rows)
    float32 = (f'largest error {worst:.1e} in float32 (goal: below 1e-5) over the {len(clean)} models whose float32 '
               'logits are within 1e-5 of their float64 ones' if clean else
               'no model\'s float32 logits are within 1e-5 of its float64 ones, so none is held to the float32 goal')
    lines += ['', f'zennit_bnfuse folds {ours} of {total} BatchNorms over {len(rows)} models (all of them in '
              f'{complete}); {float32}, {worst64:.1e} in float64 over all.']
    lines += [f'{row["model"]}: its float32 logits are {row["float32_noise"]:.1e} off its float64 ones, '
              f'zennit_bnfuse\'s float32 error {row["ours_error"]:.1e}, float64 error {row["ours_error64"]:.1e}.'
              for row in noisy]
    lines += ['', f'### BatchNorms zennit_bnfuse left in place ({suite})', '']
    unfused = [(row['model'], item) for row in rows for item in row['ours_unfused']]
    if unfused:
        lines += ['| model | BatchNorm | reason |', '| --- | --- | --- |']
        lines += [f'| {model} | {item["bn"]} | {item["reason"]} |' for model, item in unfused]
    else:
        lines.append('None: every BatchNorm of every listed model was folded.')
    return lines


def write_report(results, command):
    '''Write zoo.md and zoo.json for ``results`` (suite -> rows).'''
    details = [f'torchvision {torchvision.__version__}']
    if 'timm' in results:
        import timm
        details.append(f'timm {timm.__version__}')
    host = machine(*details)
    date = today()
    lines = header('BatchNorm coverage and exactness across torchvision and timm', command, host, date) + [
        '- models: weights=None / pretrained=False, BatchNorm statistics and affine parameters randomised (seed 0), '
        'batch of 2 random images; input side 224 for torchvision (inception_v3: 299), 64 for timm',
        '- error: max |fused - original| / max |original| over the logits, in float32 and in float64 (the model '
        'converted with `.double()`); for Zennit, measured inside its canonizer context',
        '- called: BatchNorm modules the eval-mode forward calls (forward hooks); torch.fx fuse: called BatchNorms '
        'no longer in its graph (a BatchNorm traced through counts as its `F.batch_norm` call)',
        '- Zennit restored: whether the state_dict after leaving Zennit\'s context equals the one before (both '
        'dtypes)',
        '- several layers: BatchNorms folded into more than one layer (the channels of a `torch.cat` of layer '
        'outputs, or a BatchNorm(-ReLU) output that several layers read)',
        '- float32 model vs float64: the unfused model\'s own float32 rounding, max |f32 logits - f64 logits| / '
        'max |f64 logits|; no float32 fold can be closer to the float64 model than about this',
    ]
    for suite, rows in results.items():
        lines += ['', f'## {suite}', '', *table(suite, rows)]
    lines.append('')
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'zoo.md').write_text('\n'.join(lines))
    (RESULTS / 'zoo.json').write_text(json.dumps({'command': command, 'machine': host, 'date': date,
                                                  'suites': results}, indent=1) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suites', default='torchvision,timm', help='comma-separated: torchvision, timm')
    parser.add_argument('--models', default=None, help='comma-separated architectures (one suite only)')
    parser.add_argument('--input-size', type=int, default=None, help='input side (default: 224 torchvision, 64 timm)')
    args = parser.parse_args(argv)
    suites = args.suites.split(',')
    if args.models and len(suites) != 1:
        parser.error('--models needs exactly one suite in --suites')
    results = {}
    for suite in suites:
        models = args.models.split(',') if args.models else SUITES[suite]
        size = args.input_size or INPUT_SIZES[suite]
        results[suite] = [measure(suite, arch, size) for arch in tqdm(models, desc=f'zoo ({suite})')]
    write_report(results, command_line(argv))
    print((RESULTS / 'zoo.md').read_text())


if __name__ == '__main__':
    main()
