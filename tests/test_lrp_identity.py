'''LRP-epsilon with a negligible epsilon equals gradient x input, in float64, on the zoo's networks whose layers allow
it: ReLU (or LeakyReLU), conv, linear, BatchNorm, pooling, means, residual sums and concatenations.

Each layer's epsilon rule hands down ``input * W^T (R / z)`` with ``z`` its full output (bias included); with the
relevance ``R = z * dOutput/dz`` that is ``input * dOutput/dinput``, and positively homogeneous activations
(``x * f'(x) = f(x)``) pass it unchanged. A functional op that passes relevance by its plain gradient instead (a
``x.mean([2, 3])`` spreads it uniformly) breaks the identity, so this test checks the graph rewrite
(:py:mod:`zennit_bnfuse.graph`) as much as the rules. BatchNorm is an affine layer under epsilon ('unfused') or folded
('fused'); both keep the identity.

Models are built with weights=None and random BatchNorm statistics, at the smallest input they take. The big ones are
marked ``slow`` (run them with ``--run-slow``).
'''
import ast
import functools
import itertools
import pathlib

import pytest
import torch
import torchvision

from conftest import epsilon_explainer as explainer, randomize_batch_norms

TOLERANCE = 1e-9

# (source, name, input size, slow); the zoo's models (benchmarks/zoo.py) whose activations are positively
# homogeneous, shufflenet (it pools with x.mean([2, 3])) and timm families with ReLU or LeakyReLU (resnetblur18
# blurs with a functional conv on a filter it holds; regnetx_002 is RegNetY without its gates)
MODELS = [
    ('torchvision', 'resnet18', 32, False), ('torchvision', 'densenet121', 32, False),
    ('torchvision', 'shufflenet_v2_x0_5', 32, False), ('torchvision', 'mnasnet1_0', 32, False),
    ('torchvision', 'vgg11_bn', 32, True), ('torchvision', 'vgg16_bn', 32, True),
    ('torchvision', 'resnet50', 32, True), ('torchvision', 'resnext50_32x4d', 32, True),
    ('torchvision', 'wide_resnet50_2', 32, True), ('torchvision', 'inception_v3', 75, True),
    ('timm', 'resnet26d', 32, False), ('timm', 'dla34', 32, False), ('timm', 'regnetx_002', 32, False),
    ('timm', 'vovnet39a', 32, False), ('timm', 'cspresnet50', 32, False), ('timm', 'resnetblur18', 32, False),
    ('timm', 'densenet121', 32, True), ('timm', 'dpn68', 32, True), ('timm', 'res2net50_14w_8s', 32, True),
    ('timm', 'repvgg_a0', 32, True), ('timm', 'resnet18', 32, False), ('timm', 'resnetv2_50', 32, True),
    ('timm', 'hrnet_w18_small', 32, False), ('timm', 'xception41', 32, True), ('timm', 'selecsls42b', 32, False),
    ('timm', 'mobileone_s0', 32, True), ('timm', 'mobilenetv4_conv_small', 32, False),
]
# the zoo's models left out, and why (besides, their squeeze-and-excitation gates give the gated signal all the
# relevance, where gradient x input credits the gate's branch too)
EXCLUDED = {
    'mobilenet_v2': (torch.nn.ReLU6, 'ReLU6 saturates: x * relu6\'(x) = 0 != 6 = relu6(x) for x > 6'),
    'mobilenet_v3_small': (torch.nn.Hardswish, 'Hardswish is not positively homogeneous'),
    'efficientnet_b0': (torch.nn.SiLU, 'SiLU is not positively homogeneous'),
    'efficientnet_v2_s': (torch.nn.SiLU, 'SiLU is not positively homogeneous'),
}
# the same for timm's models in the zoo, by the class name of a module that breaks the identity
SQUEEZE_EXCITATION = 'a squeeze-and-excitation gate'
SILU = ('SiLU', 'SiLU is not positively homogeneous')
HARDSWISH = ('Hardswish', 'Hardswish is not positively homogeneous')
EXCLUDED_TIMM = {
    'seresnext26d_32x4d': ('SEModule', SQUEEZE_EXCITATION), 'regnety_002': ('SEModule', SQUEEZE_EXCITATION),
    'ghostnet_050': ('SqueezeExcite', SQUEEZE_EXCITATION), 'repghostnet_050': ('SqueezeExcite', SQUEEZE_EXCITATION),
    'ese_vovnet19b_dw': ('EffectiveSEModule', SQUEEZE_EXCITATION),
    'resnest14d': ('RadixSoftmax', 'split attention weighs its branches by a softmax'),
    'skresnet18': ('SelectiveKernelAttn', 'selective kernels weigh their branches by a softmax'),
    **dict.fromkeys(('efficientnet_b0', 'tf_efficientnet_b0', 'efficientnet_cc_b0_4e', 'efficientnetv2_rw_t',
                     'mixnet_s', 'tf_mixnet_s', 'cs3darknet_focus_s', 'rexnet_100', 'mobilevit_xxs'), SILU),
    **dict.fromkeys(('mobilenetv3_large_100', 'lcnet_050'), HARDSWISH),
    'hgnetv2_b0': ('LearnableAffineBlock', 'a learned bias added by a functional op, which passes relevance by its '
                   'gradient (with a warning); the identity holds at initialisation only, where the bias is zero'),
}
HANDLINGS = ['fused', 'unfused']
ENGINES = ['FusedLRP', 'CompositeLRP']


def build(source, name):
    '''The model with weights=None, float64, random BatchNorm statistics, in eval mode.'''
    torch.manual_seed(0)
    if source == 'timm':
        timm = pytest.importorskip('timm', reason='timm models need timm (the test extra)')
        model = timm.create_model(name, pretrained=False)
    else:
        kwargs = {'init_weights': True, 'aux_logits': False} if name == 'inception_v3' else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return randomize_batch_norms(model.double())


@functools.lru_cache(maxsize=1)
def reference(source, name, size):
    '''The model, an input, the explained class and gradient x input for it.'''
    model = build(source, name)
    input = torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    input.requires_grad_(True)
    output = model(input)
    target = output.argmax().item()
    gradient, = torch.autograd.grad(output[0, target], input)
    return model, input.detach(), target, (gradient * input).detach()


def cases():
    '''(model, handling, engine), model-major so that :py:func:`reference` builds each model once.'''
    for (source, name, size, slow), handling, engine in itertools.product(MODELS, HANDLINGS, ENGINES):
        yield pytest.param(source, name, size, handling, engine, marks=[pytest.mark.slow] if slow else [],
                           id=f'{source}-{name}-{handling}-{engine}')


@pytest.mark.parametrize('source, name, size, handling, engine', list(cases()))
def test_epsilon_equals_gradient_times_input(source, name, size, handling, engine):
    model, input, target, expected = reference(source, name, size)
    lrp = explainer(engine, model, handling)
    relevance = lrp.attribute(input, target=target)
    error = ((relevance - expected).abs().max() / expected.abs().max()).item()
    assert error < TOLERANCE, f'{name} ({handling}, {engine}): relative error {error:.3g}'


@pytest.mark.parametrize('name', EXCLUDED)
def test_excluded_models_have_the_layers_that_break_the_identity(name):
    layer_type, reason = EXCLUDED[name]
    model = getattr(torchvision.models, name)(weights=None)
    assert any(isinstance(module, layer_type) for module in model.modules()), reason


@pytest.mark.parametrize('name', EXCLUDED_TIMM)
def test_excluded_timm_models_have_the_layers_that_break_the_identity(name):
    timm = pytest.importorskip('timm', reason='timm models need timm (the test extra)')
    type_name, reason = EXCLUDED_TIMM[name]
    model = timm.create_model(name, pretrained=False)
    assert type_name in {type(module).__name__ for module in model.modules()}, reason


def test_every_zoo_model_is_checked_or_excluded_with_a_reason():
    '''benchmarks/zoo.py's models: each is in MODELS or excluded with the layer that breaks the identity.'''
    text = (pathlib.Path(__file__).parents[1] / 'benchmarks' / 'zoo.py').read_text()
    zoo = {target.id: ast.literal_eval(node.value) for node in ast.parse(text).body if isinstance(node, ast.Assign)
           for target in node.targets if getattr(target, 'id', None) in ('TORCHVISION_MODELS', 'TIMM_MODELS')}
    checked = {(source, name) for source, name, _, _ in MODELS}
    assert {name for name in zoo['TORCHVISION_MODELS'] if ('torchvision', name) not in checked} == set(EXCLUDED)
    assert {name for name in zoo['TIMM_MODELS'] if ('timm', name) not in checked} == set(EXCLUDED_TIMM)
