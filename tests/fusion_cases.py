'''Small float64 models for every case the fusion engine must fold, and every case it must leave alone.

Each case is ``(model, input, folds, unfused)``: ``folds`` maps BN name -> (layer name, side) and ``unfused`` maps BN
name -> a regular expression the reason must match.
'''
import operator

import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import randomize_batch_norms

CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
CONV_TRANSPOSE = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}
BATCH_NORM = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def prepared(model, *input_shape, seed=0):
    '''``(model, input)``: the model in float64 with random BN statistics, and a random input.'''
    torch.manual_seed(seed)
    model = randomize_batch_norms(model.double(), seed=seed)
    return model, torch.randn(*input_shape, dtype=torch.float64)


def spatial(dims, size=6):
    return (size,) * dims


class Functional(torch.nn.Module):
    '''BN registered before its conv, functional ops in forward: only the graph shows the pairs.'''
    def __init__(self):
        super().__init__()
        self.bn_out = torch.nn.BatchNorm2d(4)
        self.bn_in = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn_out(self.conv(self.bn_in(x)))
        return self.head(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


class Lambda(torch.nn.Module):
    '''Wrap a forward function and named modules.'''
    def __init__(self, function, **modules):
        super().__init__()
        self.function = function
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x):
        return self.function(self, x)


class BatchNormRelu2d(torch.nn.BatchNorm2d):
    '''A BatchNorm2d subclass that also applies a ReLU (like timm's BatchNormAct2d).'''
    def forward(self, input):
        return torch.relu(super().forward(input))


class ScaledConv2d(torch.nn.Conv2d):
    '''A Conv2d subclass whose forward changes the weight.'''
    def forward(self, input):
        return self._conv_forward(input, self.weight / self.weight.norm(), self.bias)


def with_scales(model, index, scales):
    '''Set the affine weight of BatchNorm ``index`` of ``model`` (its position in a Sequential or its name; negative
    and zero scales included).'''
    with torch.no_grad():
        model.get_submodule(str(index)).weight.copy_(torch.tensor(scales, dtype=torch.float64))
    return model


class FunctionalRelu(torch.nn.Module):
    '''BN -> F.relu -> max pool -> conv, written in forward.'''
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(F.max_pool2d(F.relu(self.bn(x)), 2))


def must_fuse():
    '''Cases that must fold, as ``{case id: (model, input, folds)}``.'''
    cases = {}
    for dims in (1, 2, 3):
        conv, batch_norm = CONV[dims], BATCH_NORM[dims]
        cases[f'conv{dims}d-bn'] = (*prepared(torch.nn.Sequential(
            conv(3, 4, 3, stride=2, padding=1), batch_norm(4)), 2, 3, *spatial(dims)), {'1': ('0', 'after')})
        cases[f'conv{dims}d-dilated-grouped-bn'] = (*prepared(torch.nn.Sequential(
            conv(4, 6, 3, dilation=2, groups=2, padding=2, bias=False), batch_norm(6)), 2, 4, *spatial(dims)),
            {'1': ('0', 'after')})
        cases[f'conv{dims}d-depthwise-bn'] = (*prepared(torch.nn.Sequential(
            conv(4, 4, 3, groups=4, padding=1, padding_mode='reflect'), batch_norm(4)), 2, 4, *spatial(dims)),
            {'1': ('0', 'after')})
        cases[f'convtranspose{dims}d-grouped-bn'] = (*prepared(torch.nn.Sequential(
            CONV_TRANSPOSE[dims](4, 6, 3, stride=2, groups=2, padding=1, output_padding=1), batch_norm(6)),
            2, 4, *spatial(dims, 4)), {'1': ('0', 'after')})
        cases[f'bn-conv{dims}d-zero-padding'] = (*prepared(torch.nn.Sequential(
            batch_norm(3), conv(3, 4, 3, padding=1, stride=2)), 2, 3, *spatial(dims)), {'0': ('1', 'before')})
        cases[f'bn-conv{dims}d-grouped-same'] = (*prepared(torch.nn.Sequential(
            batch_norm(4), conv(4, 2, 3, padding='same', groups=2, dilation=2)), 2, 4, *spatial(dims)),
            {'0': ('1', 'before')})
        for mode in ('reflect', 'replicate', 'circular'):
            cases[f'bn-conv{dims}d-{mode}'] = (*prepared(torch.nn.Sequential(
                batch_norm(3), conv(3, 4, 3, padding=1, padding_mode=mode)), 2, 3, *spatial(dims)),
                {'0': ('1', 'before')})
    cases['linear-bn1d'] = (*prepared(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)), 3, 5),
                            {'1': ('0', 'after')})
    cases['bn1d-linear'] = (*prepared(torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 4)), 3, 5),
                            {'0': ('1', 'before')})
    cases['affine-false'] = (*prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, affine=False),
        torch.nn.BatchNorm2d(4, affine=False), torch.nn.Conv2d(4, 2, 1, bias=False)), 2, 3, 6, 6),
        {'1': ('0', 'after'), '2': ('3', 'before')})
    cases['frozen-bn'] = (*prepared(torch.nn.Sequential(
        FrozenBatchNorm2d(3), torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), FrozenBatchNorm2d(4)), 2, 3, 5, 5),
        {'0': ('1', 'before'), '2': ('1', 'after')})
    # an in-place write into the BatchNorm's input before it reads it: the identity it leaves reads the same
    cases['bn-input-written-in-place-before'] = (*prepared(Lambda(
        lambda self, x: (lambda y: self.conv(self.bn(torch.relu_(y))))(x * 1.), bn=torch.nn.BatchNorm2d(3),
        conv=torch.nn.Conv2d(3, 2, 3, padding=1)), 2, 3, 5, 5), {'bn': ('conv', 'before')})
    # torch's eval-mode forward reads the running statistics wherever they exist, whatever the flag says
    model, input = prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), 2, 3, 5, 5)
    model[1].track_running_stats = False
    cases['bn-flag-off-after-training'] = (model, input, {'1': ('0', 'after')})
    cases['conv-bn-conv-folds-before'] = (*prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 3)), 2, 3, 7, 7),
        {'1': ('0', 'after')})
    cases['functional-forward'] = (*prepared(Functional(), 2, 3, 5, 5),
                                   {'bn_in': ('conv', 'before'), 'bn_out': ('conv', 'after')})
    # BN -> ReLU -> layer: negative and zero scales, zero padding, ops the scale moves through
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 3, 3, padding=1)), 2, 4, 6, 6)
    cases['bn-relu-conv-negative-zero-scales'] = (with_scales(model, 0, [1.5, -.7, 0., -2.]), input,
                                                  {'0': ('2', 'before-relu')})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Dropout(), torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 3, 2)), 2, 3, 6, 6)
    cases['bn-relu-pool-flatten-linear'] = (with_scales(model, 0, [-1., 0., .5]), input,
                                            {'0': ('5', 'before-relu')})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 2)), 4, 5)
    cases['bn1d-relu-linear'] = (with_scales(model, 0, [1., -1., 0., 2., -.5]), input, {'0': ('2', 'before-relu')})
    cases['bn-functional-relu-maxpool-conv'] = (*prepared(FunctionalRelu(), 2, 3, 6, 6),
                                                {'bn': ('conv', 'before-relu')})
    cases['cat-of-convs-bn'] = (*prepared(Lambda(
        lambda self, x: torch.sigmoid(self.bn(torch.cat([self.conv1(x), self.conv2(x)], dim=1))),
        conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 3, 3, bias=False), bn=torch.nn.BatchNorm2d(5)),
        2, 3, 5, 5), {'bn': ('conv1', 'after')})
    for function, dim in ((torch.cat, 'dim'), (torch.concat, 'dim'), (torch.concatenate, 'axis')):
        # every operand by keyword: the traced node has no positional args
        cases[f'{function.__name__}-by-keyword-bn'] = (*prepared(Lambda(
            lambda self, x, function=function, dim=dim: self.bn(function(
                tensors=[self.conv1(x), self.conv2(x)], **{dim: 1})),
            conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 3, 3), bn=torch.nn.BatchNorm2d(5)),
            2, 3, 5, 5), {'bn': ('conv1', 'after')})
    # the channel dim counted from the end (BatchNorm2d: 4-d input)
    cases['cat-of-convs-on-dim-minus-3-bn'] = (*prepared(Lambda(
        lambda self, x: torch.sigmoid(self.bn(torch.cat([self.conv1(x), self.conv2(x)], dim=-3))),
        conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 3, 3), bn=torch.nn.BatchNorm2d(5)),
        2, 3, 5, 5), {'bn': ('conv1', 'after')})
    cases['conv-dropout-bn'] = (*prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout2d(), torch.nn.Identity(), torch.nn.BatchNorm2d(4)), 2, 3, 5, 5),
        {'3': ('0', 'after')})
    cases['bn-dropout-conv'] = (*prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Dropout(), torch.nn.Identity(), torch.nn.Conv2d(3, 2, 3, padding=1)),
        2, 3, 5, 5), {'0': ('3', 'before')})
    # a pre-activation shared by a conv and a projection shortcut (He et al.), one through a pooling
    model, input = prepared(Lambda(
        lambda self, x: (lambda h: self.conv(h) + self.shortcut(h) + self.pooled(F.avg_pool2d(h, 2)))(
            F.relu(self.bn(x))), bn=torch.nn.BatchNorm2d(4), conv=torch.nn.Conv2d(4, 3, 3, stride=2, padding=1),
        shortcut=torch.nn.Conv2d(4, 3, 1, stride=2), pooled=torch.nn.Conv2d(4, 3, 1)), 2, 4, 6, 6)
    cases['bn-relu-shared-by-three-layers'] = (with_scales(model, 'bn', [1.5, -.7, 0., -2.]), input,
                                               {'bn': ('conv', 'before-relu')})
    cases['bn-shared-by-two-convs'] = (*prepared(Lambda(
        lambda self, x: (lambda h: self.conv(h) + self.shortcut(h))(self.bn(x)), bn=torch.nn.BatchNorm2d(3),
        conv=torch.nn.Conv2d(3, 2, 3, padding=1), shortcut=torch.nn.Conv2d(3, 2, 1)), 2, 3, 5, 5),
        {'bn': ('conv', 'before')})
    # BN -> pooling -> layer (no ReLU): averages of real inputs pass the whole affine map, a maximum a scale >= 0
    model, input = prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Dropout(), torch.nn.Flatten(), torch.nn.Linear(16, 2)), 2, 3, 7, 7)
    cases['bn-adaptive-avgpool-flatten-linear'] = (with_scales(model, 2, [1., -2., 0., .5]), input,
                                                   {'2': ('6', 'before')})
    for name, pool, size in (
            ('avgpool-ceil-mode', torch.nn.AvgPool2d(3, 2, ceil_mode=True), 8),  # the last window partly outside
            ('avgpool-padding-not-counted', torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False), 7),
            ('functional-avgpool-padding-not-counted', Lambda(
                lambda self, x: F.avg_pool2d(x, 3, 2, 1, False, count_include_pad=False)), 7),
            ('functional-adaptive-avgpool', Lambda(lambda self, x: F.adaptive_avg_pool2d(x, 3)), 7)):
        model, input = prepared(torch.nn.Sequential(
            torch.nn.BatchNorm2d(3), pool, torch.nn.Conv2d(3, 2, 3, padding=1)), 2, 3, size, size)
        cases[f'bn-{name}-conv'] = (with_scales(model, 0, [1., -2., .5]), input, {'0': ('2', 'before')})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 2, 1)), 2, 3, 8, 8)
    cases['bn-maxpool-conv-non-negative-scales'] = (with_scales(model, 1, [1., 0., .5]), input, {'1': ('3', 'before')})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm3d(2), torch.nn.AvgPool3d(2), torch.nn.Conv3d(2, 2, 1)), 2, 2, 4, 4, 4)
    cases['bn3d-avgpool3d-conv3d'] = (with_scales(model, 0, [-1., 2.]), input, {'0': ('2', 'before')})
    # a BatchNorm1d or SyncBatchNorm through a pooling into a convolution (which checks its input's rank as it runs)
    for name, pool in (('relu-maxpool', [torch.nn.ReLU(), torch.nn.MaxPool1d(2)]),
                       ('avgpool', [torch.nn.AvgPool1d(2)])):
        model, input = prepared(torch.nn.Sequential(
            torch.nn.Conv1d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm1d(4), *pool,
            torch.nn.Conv1d(4, 2, 3, padding=1)), 2, 3, 12)
        cases[f'bn1d-{name}-conv1d'] = (with_scales(model, 2, [1., .5, 2., .3]), input, {
            '2': (str(len(pool) + 3), 'before-relu' if len(pool) > 1 else 'before')})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.SyncBatchNorm(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 2, 3)), 2, 3, 10, 10)
    cases['sync-bn-relu-maxpool-conv'] = (model.eval(), input, {'2': ('5', 'before-relu')})
    # hooks that see nothing the fold changes: a forward pre-hook on a block whose output the fold changes, hooks on
    # blocks that share one activation module, each folding inside itself
    model, input = prepared(torch.nn.Sequential(torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(3)), torch.nn.Conv2d(3, 2, 1)), 2, 3, 5, 5)
    model[0].register_forward_pre_hook(lambda module, args: None)
    cases['pre-hooked-block-holding-the-batch-norm-only'] = (model, input, {'0.2': ('1', 'before')})
    relu = torch.nn.ReLU()
    blocks = [Lambda(lambda self, x: self.conv(self.act(self.bn(x))), bn=torch.nn.BatchNorm2d(3), act=relu,
                     conv=torch.nn.Conv2d(3, 3, 1)) for _ in range(2)]
    model, input = prepared(torch.nn.Sequential(*blocks), 2, 3, 5, 5)
    for block in model:
        block.register_forward_hook(lambda module, args, output: None)
    cases['hooked-blocks-sharing-an-activation'] = (
        with_scales(with_scales(model, '0.bn', [1., .5, 2.]), '1.bn', [.3, 1., 1.]), input,
        {'0.bn': ('0.conv', 'before-relu'), '1.bn': ('1.conv', 'before-relu')})
    return cases


def must_not_fuse():
    '''Cases that must not fold, as ``{case id: (model, input, unfused)}``.'''
    cases = {}
    cases['bn-input-also-feeds-add'] = (*prepared(Lambda(
        lambda self, x: (lambda y: torch.sigmoid(self.bn(y)) + y)(self.conv(x)), conv=torch.nn.Conv2d(3, 3, 3),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'output of `conv` also feeds `\+`'})
    cases['bn-output-also-feeds-add'] = (*prepared(Lambda(
        lambda self, x: (lambda z: self.conv(z) + z)(self.bn(x)), conv=torch.nn.Conv2d(3, 3, 3, padding=1),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'feeds 2 ops \(`conv` \(Conv2d\), `\+`\)'})
    cases['relu-between-layer-and-bn'] = (*prepared(Lambda(
        lambda self, x: self.bn(F.relu(self.conv(x))), conv=torch.nn.Conv2d(3, 3, 3), bn=torch.nn.BatchNorm2d(3)),
        2, 3, 5, 5), {'bn': r'input comes from `F\.relu`.*feeds the model output'})
    cases['add-between-layer-and-bn'] = (*prepared(Lambda(
        lambda self, x: torch.tanh(self.bn(self.conv(x) + 1.)), conv=torch.nn.Conv2d(3, 3, 3),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'input comes from `\+`.*feeds `torch\.tanh`'})
    cases['cat-of-conv-and-input-before-bn'] = (*prepared(Lambda(
        lambda self, x: torch.sigmoid(self.bn(torch.cat([self.conv(x), x], dim=1))),
        conv=torch.nn.Conv2d(3, 2, 3, padding=1), bn=torch.nn.BatchNorm2d(5)), 2, 3, 5, 5),
        {'bn': r'input comes from `torch\.cat`.*cannot be split.*: the model input `x` is not a conv/linear layer'})
    cases['cat-of-conv-also-used-before-bn'] = (*prepared(Lambda(
        lambda self, x: (lambda y: torch.sigmoid(self.bn(torch.cat([y, self.conv2(x)], dim=1))) + y.sum())(
            self.conv1(x)), conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 2, 3),
        bn=torch.nn.BatchNorm2d(4)), 2, 3, 5, 5), {'bn': r'cannot be split.*output of `conv1` also feeds `\.sum\(\)`'})
    cases['cat-on-dim-0-before-bn'] = (*prepared(Lambda(
        lambda self, x: torch.sigmoid(self.bn(torch.cat([self.conv1(x), self.conv2(x)]))),
        conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 2, 3), bn=torch.nn.BatchNorm2d(2)), 2, 3, 5, 5),
        {'bn': r'input comes from `torch\.cat`, not a conv/linear layer\)'})
    cases['cat-on-dim-minus-1-before-bn'] = (*prepared(Lambda(
        lambda self, x: torch.sigmoid(self.bn(torch.cat([self.conv1(x), self.conv2(x)], dim=-1))),
        conv1=torch.nn.Conv2d(3, 2, 3), conv2=torch.nn.Conv2d(3, 2, 3), bn=torch.nn.BatchNorm2d(2)), 2, 3, 5, 5),
        {'bn': r'input comes from `torch\.cat`, not a conv/linear layer\)'})
    cases['relu-shared-with-add'] = (*prepared(Lambda(
        lambda self, x: (lambda h: self.conv(h) + h)(F.relu(self.bn(x))), bn=torch.nn.BatchNorm2d(3),
        conv=torch.nn.Conv2d(3, 3, 1)), 2, 3, 5, 5),
        {'bn': r'output of `F\.relu` feeds 2 ops \(`conv` \(Conv2d\), `\+`\), and `\+` follows, through which'})
    # folded away, the BatchNorm would pass on its input itself, which is written in place after it is read
    cases['bn-input-written-in-place-after'] = (*prepared(Lambda(
        lambda self, x: (lambda y: self.conv(self.bn(y)) + self.act(y))(x * 1.), bn=torch.nn.BatchNorm2d(3),
        act=torch.nn.ReLU(inplace=True), conv=torch.nn.Conv2d(3, 3, 3, padding=1)), 2, 3, 5, 5),
        {'bn': r'`act` \(ReLU\) writes in place into its input after it reads it'})
    # ``x += 1.`` on a tensor: operator.iadd, as Python calls it for the augmented assignment
    cases['bn-input-augmented-after'] = (*prepared(Lambda(
        lambda self, x: (lambda y: (lambda z: [operator.iadd(y, 1.), self.conv(z) + y][1])(self.bn(y)))(x * 1.),
        bn=torch.nn.BatchNorm2d(3), conv=torch.nn.Conv2d(3, 3, 3, padding=1)), 2, 3, 5, 5),
        {'bn': r'`\+=` writes in place into its input after it reads it'})
    cases['bn-input-view-written-in-place-after'] = (*prepared(Lambda(
        lambda self, x: (lambda y: (lambda z: [y.flatten().add_(1.), self.conv(z)][1])(self.bn(y)))(x * 1.),
        bn=torch.nn.BatchNorm2d(3), conv=torch.nn.Conv2d(3, 3, 3, padding=1)), 2, 3, 5, 5),
        {'bn': r'`\.add_\(\)` writes in place into its input after it reads it'})
    # writes the alias analysis learnt from a review: through views it did not know, into ``out=``, by ``x[i] = v``
    for name, write, writer in [
            ('ravel', lambda y: y.ravel().mul_(3.), r'`\.mul_\(\)`'),
            ('as-strided', lambda y: torch.as_strided(y, y.shape, y.stride()).mul_(3.), r'`\.mul_\(\)`'),
            ('atleast-2d', lambda y: torch.atleast_2d(y).mul_(3.), r'`\.mul_\(\)`'),
            ('out', lambda y: torch.add(y, 1., out=y), r'`torch\.add`'),
            ('setitem', lambda y: y.__setitem__((slice(None), 0), 0.), r'`\[\] =`')]:
        cases[f'bn-input-written-after-{name}'] = (*prepared(Lambda(
            lambda self, x, write=write: (lambda y: (lambda z: [write(y), self.conv(z)][1])(self.bn(y)))(x * 1.),
            bn=torch.nn.BatchNorm2d(3), conv=torch.nn.Conv2d(3, 3, 3, padding=1)), 2, 3, 5, 5),
            {'bn': writer + r' writes in place into its input after it reads it'})
    cases['shared-with-and-without-relu'] = (*prepared(Lambda(
        lambda self, x: (lambda h: self.conv1(h) + self.conv2(F.relu(h)))(self.bn(x)), bn=torch.nn.BatchNorm2d(3),
        conv1=torch.nn.Conv2d(3, 2, 1), conv2=torch.nn.Conv2d(3, 2, 1)), 2, 3, 5, 5),
        {'bn': r'some layers read its output through a ReLU and others without'})
    cases['shared-with-transposed-conv'] = (*prepared(Lambda(
        lambda self, x: (lambda h: self.conv(h).sum() + self.up(h).sum())(F.relu(self.bn(x))),
        bn=torch.nn.BatchNorm2d(3), conv=torch.nn.Conv2d(3, 2, 1), up=torch.nn.ConvTranspose2d(3, 2, 2)),
        2, 3, 5, 5), {'bn': r'feeds 2 ops.*and `up` is a transposed convolution'})
    model, input = prepared(torch.nn.Sequential(
        torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 2, 1)), 2, 3, 8, 8)
    cases['bn-maxpool-conv-negative-scale'] = (with_scales(model, 1, [1., -.5, 0.]), input, {
        '1': r'input comes from `0` \(MaxPool2d\).*feeds `2` \(MaxPool2d\), which takes the maximum, and the '
             r'BatchNorm\'s scale is negative in channel\(s\) 1, where'})
    for name, pool, reason in (
            ('avgpool-counting-padding', torch.nn.AvgPool2d(3, 2, 1), r'averages zero padding into its border'),
            ('functional-avgpool-counting-padding', Lambda(lambda self, x: F.avg_pool2d(x, 3, 2, padding=1)),
             r'`F\.avg_pool2d`, which averages zero padding'),
            ('avgpool-divisor-override', torch.nn.AvgPool2d(2, divisor_override=3), r'divisor_override'),
            ('avgpool-then-relu', torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.ReLU()),
             r'`3\.1` \(ReLU\) follows `3\.0` \(AvgPool2d\), so the BatchNorm cannot become a thresholded ReLU'),
            # on (N, C, H, W) a 3d pooling reads the channels as a spatial dim: averaged over 3, kept in number
            ('pool3d-after-batchnorm2d', torch.nn.AvgPool3d((3, 1, 1), 1, (1, 0, 0), count_include_pad=False),
             r'pools the last 3 dim\(s\), the spatial dims of the BatchNorm\'s input only where that has 5 dims; '
             r'the BatchNorm2d takes 4, so the pooling mixes its channels')):
        cases[f'bn-{name}-conv'] = (*prepared(torch.nn.Sequential(
            torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.BatchNorm2d(3), pool, torch.nn.Conv2d(3, 2, 1)),
            2, 3, 8, 8), {'2': reason})
    # a BatchNorm1d may take (N, C): a 1d pooling then pools its channels (these folds were 0.12-0.70 off)
    for name, tail in (('relu-avgpool', [torch.nn.ReLU(), torch.nn.AvgPool1d(3, 1, 1, count_include_pad=False)]),
                       ('avgpool', [torch.nn.AvgPool1d(3, 1, 1, count_include_pad=False)]),
                       ('maxpool', [torch.nn.MaxPool1d(3, 1, 1)])):
        model, input = prepared(torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.BatchNorm1d(4), *tail, torch.nn.Linear(4, 2)), 6, 3)
        cases[f'bn1d-{name}-linear-on-two-dims'] = (with_scales(model, 2, [1., .5, 2., .3]), input, {
            '2': r'pools the last 1 dim\(s\), the spatial dims of the BatchNorm\'s input only where that has 3 dims; '
                 r'the BatchNorm1d may take another rank \(BatchNorm1d: \(N, C\)\), which the Linear after it cannot '
                 r'tell, and then the pooling mixes its channels'})
    cases['relu-then-add-between-bn-and-layer'] = (*prepared(Lambda(
        lambda self, x: self.conv(F.relu(self.bn(x)) + 1.), conv=torch.nn.Conv2d(3, 2, 1),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'`\+` follows, through which its scale cannot move'})
    cases['layer-output-feeds-two-bns'] = (*prepared(Lambda(
        lambda self, x: (lambda y: torch.relu(self.bn1(y)) + torch.relu(self.bn2(y)))(self.conv(x)),
        conv=torch.nn.Conv2d(3, 3, 3), bn1=torch.nn.BatchNorm2d(3), bn2=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5),
        {'bn1': r'output of `conv` also feeds `bn2`', 'bn2': r'output of `conv` also feeds `bn1`'})
    cases['no-running-statistics'] = (*prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False)), 2, 3, 5, 5),
        {'1': r'no running statistics'})
    cases['layer-called-twice'] = (*prepared(Lambda(
        lambda self, x: self.bn(self.conv(self.conv(x))), conv=torch.nn.Conv2d(3, 3, 3, padding=1),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'`conv` is called 2 times'})
    cases['bn-called-twice'] = (*prepared(Lambda(
        lambda self, x: self.bn(self.conv(self.bn(x))), conv=torch.nn.Conv2d(3, 3, 3, padding=1),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'`bn` is called 2 times'})
    cases['layer-subclass'] = (*prepared(torch.nn.Sequential(
        ScaledConv2d(3, 3, 3), torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'1': r'ScaledConv2d, a subclass'})
    cases['layer-weight-read-directly'] = (*prepared(Lambda(
        lambda self, x: self.bn(self.conv(x)) * self.conv.weight.sum(), conv=torch.nn.Conv2d(3, 3, 3),
        bn=torch.nn.BatchNorm2d(3)), 2, 3, 5, 5), {'bn': r'parameters of `conv` are also read directly'})
    shared = torch.nn.Conv2d(3, 3, 3)
    cases['layer-registered-twice'] = (*prepared(Lambda(
        lambda self, x: self.bn(self.alias(x)), conv=shared, alias=shared, bn=torch.nn.BatchNorm2d(3)),
        2, 3, 5, 5), {'bn': r'registered under several names'})
    cases['batch-norm-subclass'] = (*prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3), BatchNormRelu2d(3), torch.nn.Conv2d(3, 2, 1)), 2, 3, 5, 5),
        {'1': r'it is a BatchNormRelu2d, a BatchNorm subclass'})
    model, input = prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)), 2, 3, 5, 5)
    torch.nn.utils.weight_norm(model[0])
    cases['weight-norm-layer'] = (model, input, {'1': r'`0` has forward or backward hooks \(weight_norm'})
    model, input = prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)), 2, 3, 5, 5)
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    cases['batch-norm-with-hook'] = (model, input, {'1': r'`1` has forward or backward hooks'})
    # folds that change what hooks see: a block holding the layer but not the BatchNorm (timm's FeatureHookNet hooks
    # blocks), an activation between them, as a module or as a function in a module, a module that is the identity
    # in eval mode (timm's DropPath: no node of its own)
    model, input = prepared(torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)),
                                                torch.nn.BatchNorm2d(3), torch.nn.Sigmoid()), 2, 3, 5, 5)
    model[0].register_forward_hook(lambda module, args, output: None)
    cases['hooked-block-holding-the-layer-only'] = (model, input, {
        '1': r'`0` \(Sequential\) has hooks that see `0\.0` \(Conv2d\), whose values the fold would change'})
    for name, activation in (('relu', torch.nn.ReLU()), ('functional-relu', Lambda(lambda self, x: F.relu(x)))):
        model, input = prepared(torch.nn.Sequential(
            torch.nn.BatchNorm2d(3), activation, torch.nn.Conv2d(3, 2, 1)), 2, 3, 5, 5)
        model[1].register_forward_hook(lambda module, args, output: None)
        cases[f'hooked-{name}-between-batch-norm-and-layer'] = (model, input, {
            '0': r'`1` \((ReLU|Lambda)\) has hooks that see `0` \(BatchNorm2d\)'})
    model, input = prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), Lambda(
        lambda self, x: x * 2 if self.training else x), torch.nn.BatchNorm2d(3), torch.nn.Sigmoid()), 2, 3, 5, 5)
    model[1].register_forward_hook(lambda module, args, output: None)
    cases['hooked-eval-identity-between-layer-and-batch-norm'] = (model, input, {
        '2': r'`1` \(Lambda\) has hooks that see `0` \(Conv2d\)'})
    cases['linear-then-batchnorm2d'] = (*prepared(torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm2d(3)), 2, 3, 5, 4),
        {'1': r'`0` is a Linear, whose features are on the last dim'})
    cases['channel-mismatch-linear-on-last-dim'] = (*prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Linear(3, 2)), 2, 3, 5, 3), {'0': r'Linear applied to the last dim'})
    cases['bn-before-transposed-conv'] = (*prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.ConvTranspose2d(3, 2, 3)), 2, 3, 5, 5), {'0': r'transposed convolution'})
    return cases


class Untraceable(torch.nn.Module):
    '''Data-dependent control flow defeats torch.fx; the Sequential's fold (conv -> BN) is right, `bn` has none.'''
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.block(x)
        if x.sum() > 0:
            x = -x
        return torch.tanh(self.bn(self.conv(x)))


class Sliced(torch.nn.Module):
    '''Calls its Sequential in two slices with tanh between conv `0` and BN `1` (the issue's first wrong fold); BN
    `4` does follow conv `3`. Untraceable (data-dependent control flow).'''
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                            torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))

    def forward(self, x):
        a = self.features[:1](x)
        if a.sum() > 0:
            a = a * 2.
        return self.features[1:](torch.tanh(a))


class Reordered(torch.nn.Module):
    '''Calls its Sequential's children in another order than listed: each BN runs before the conv listed before it
    (the issue's second wrong fold). Untraceable (data-dependent control flow).'''
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                            torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.features[0](self.features[1](x))
        if x.sum() > 0:
            x = x * 2.
        return self.features[2](self.features[3](x))


def untraceable_cases():
    '''Untraceable models, as ``{case id: (model, input, folds)}``: ``folds`` are the Sequential neighbours that
    give the model's output (BN name -> (layer name, side)).'''
    return {
        'sequential-folds-right': (*prepared(Untraceable(), 2, 3, 5, 5), {'block.1': ('block.0', 'after')}),
        'sliced-sequential': (*prepared(Sliced(), 2, 3, 5, 5), {'features.4': ('features.3', 'after')}),
        'reordered-children': (*prepared(Reordered(), 2, 4, 5, 5), {}),
    }


def rank_dependent_relu():
    '''BN1d -> ReLU -> Linear on ``(N, C, L)``, scales far apart so that mixing up C and L shows.'''
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), 2, 3, 3)
    return with_scales(model, 0, [3., .2, -1.]), input


def rank_dependent_cases():
    '''Folds that are exact only for inputs of one rank, with an input of another rank on which the BatchNorm
    runs, as ``{case id: (model, input, (bn, layer))}`` (the issue's three cases and an unbatched Conv1d).'''
    # on (N, C) the 1d pooling pools the BatchNorm's channels, and the Conv1d reads one unbatched example
    pooled, pooled_input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), torch.nn.MaxPool1d(3, 1, 1), torch.nn.Conv1d(3, 2, 1)), 3, 3)
    return {
        'linear-bn1d-on-nlc': (*prepared(torch.nn.Sequential(
            torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)), 2, 3, 3), ('1', '0')),
        'bn1d-linear-on-ncl': (*prepared(torch.nn.Sequential(
            torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)), 2, 3, 3), ('0', '1')),
        'bn1d-relu-linear-on-ncl': (*rank_dependent_relu(), ('0', '2')),
        'conv1d-bn1d-unbatched': (*prepared(torch.nn.Sequential(
            torch.nn.Conv1d(3, 3, 1), torch.nn.BatchNorm1d(3)), 3, 3), ('1', '0')),
        'bn1d-maxpool-conv1d-on-nc': (with_scales(pooled, 0, [1., .5, 2.]), pooled_input, ('0', '2')),
    }
