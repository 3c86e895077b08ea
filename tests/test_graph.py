'''Tests for the LRP-ready graph rewrite (zennit_bnfuse.graph).'''
import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule
from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
from zennit.layer import Sum
from zennit.rules import Epsilon
from zennit.types import Convolution

from fusion_cases import Lambda
from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.aliasing import writes_in_place
from zennit_bnfuse.graph import lrp_graph, op_name, ops_passed_by_gradient
from zennit_bnfuse.graph_layers import AddOperands, MeanReduction, SumReduction, scale_passing_relevance


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x) + x)


class Shared(torch.nn.Module):
    '''One residual block applied twice (weight sharing), a broadcasting add, an add of a buffer.'''
    def __init__(self):
        super().__init__()
        self.block = Residual()
        self.register_buffer('offset', torch.full((1, 3, 1, 1), .5))
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        x = self.block(self.block(x))
        x = x + x.mean(dim=(2, 3), keepdim=True)
        x = x + self.offset
        return self.fc(x.mean(dim=(2, 3)))


def shared():
    torch.manual_seed(0)
    return Shared().double().eval()


@pytest.mark.parametrize('residual, add_type', [('captum', Addition_Module), ('zennit', Sum)])
def test_rewrite_keeps_outputs_and_turns_residuals_into_modules(residual, add_type):
    model = shared()
    input = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    expected = model(input)
    # the add of the buffer stays an add, which passes relevance by its gradient: LRP has no rule for it
    with pytest.warns(UserWarning, match=r'1 functional op\(s\) by their plain gradient.*: add x1'):
        prepared, copies = lrp_graph(copy.deepcopy(model), residual=residual)
    torch.testing.assert_close(prepared(input), expected, rtol=0, atol=1e-12)
    adds = [name for name, module in prepared.named_modules() if type(module) is add_type]
    # two calls of the block's residual (the second in the reused block's scope), the broadcasting add; not the
    # add of the buffer
    assert adds == ['block.residual_add', 'block.residual_add_1', 'residual_add']
    assert copies == {'block.conv_1': 'block.conv', 'block.relu_1': 'block.relu'}
    targets = [node.target for node in prepared.graph.nodes if node.op == 'call_module']
    assert len(targets) == len(set(targets))


@pytest.mark.parametrize('cls', ['fused', 'composite'])
def test_lrp_runs_on_shared_modules_and_broadcasting_adds(cls):
    model = shared()
    input = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    lrp = FusedLRP(model) if cls == 'fused' else CompositeLRP(model, EpsilonPlusFlat())
    with pytest.warns(UserWarning, match='add x1'):
        relevance = lrp.attribute(input, target=1)
    assert relevance.shape == input.shape and torch.isfinite(relevance).all()


def test_identity_calls_are_removed():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity(), torch.nn.ReLU())
    prepared, _ = lrp_graph(model)
    assert [type(module) for module in prepared.children()] == [torch.nn.Linear, torch.nn.ReLU]


def test_untraceable_model_is_returned_with_a_warning():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = Branchy()
    with pytest.warns(UserWarning, match='could not trace the forward of Branchy'):
        prepared, copies = lrp_graph(model)
    assert prepared is model and copies == {}


def test_unknown_residual_kind():
    with pytest.raises(ValueError, match="residual must be one of 'captum', 'zennit', 'operands', not 'sum'"):
        lrp_graph(torch.nn.Linear(1, 1), residual='sum')


class Functional(torch.nn.Module):
    '''conv -> ``op`` -> flatten; ``op`` is written in ``forward`` as a function.'''
    def __init__(self, op):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.op = op

    def forward(self, x):
        return torch.flatten(self.op(self.conv(x)), 1)


def rewritten(op, residual='captum'):
    '''The rewritten :py:class:`Functional` model, after checking it computes what the original does.'''
    torch.manual_seed(0)
    model = Functional(op).double().eval()
    input = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    prepared, _ = lrp_graph(copy.deepcopy(model), residual=residual)
    torch.testing.assert_close(prepared(input), model(input), rtol=0, atol=1e-12)
    return prepared


def called_modules(prepared):
    return [prepared.get_submodule(node.target) for node in prepared.graph.nodes if node.op == 'call_module']


@pytest.mark.parametrize('op, expected', [
    (lambda x: x.mean([2, 3]), MeanReduction(dim=(2, 3))),
    (lambda x: torch.mean(x, (2, 3), True), MeanReduction(dim=(2, 3), keepdim=True)),
    (lambda x: x.mean(dim=None, keepdim=True), MeanReduction(keepdim=True)),
    (lambda x: x.sum().reshape(1, 1), SumReduction()),
    (lambda x: x.sum(dim=1, keepdim=True), SumReduction(dim=1, keepdim=True)),
    (lambda x: torch.sum(x, -1), SumReduction(dim=-1)),
    (lambda x: F.avg_pool1d(x.flatten(2), 3, 2), torch.nn.AvgPool1d(3, 2)),
    (lambda x: F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False),
     torch.nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)),
    (lambda x: F.avg_pool3d(x.unsqueeze(1), (1, 2, 2)), torch.nn.AvgPool3d((1, 2, 2))),
    (lambda x: F.max_pool2d(x, 3, stride=2, padding=1), torch.nn.MaxPool2d(3, stride=2, padding=1)),
    (lambda x: torch.max_pool1d(x.flatten(2), 2), torch.nn.MaxPool1d(2)),
    (lambda x: F.adaptive_avg_pool2d(x, 1), torch.nn.AdaptiveAvgPool2d(1)),
    (lambda x: F.adaptive_avg_pool1d(x.flatten(2), 4), torch.nn.AdaptiveAvgPool1d(4)),
    (lambda x: F.adaptive_max_pool2d(x, (2, 1)), torch.nn.AdaptiveMaxPool2d((2, 1))),
    (lambda x: F.relu(x, inplace=True), torch.nn.ReLU()),
    (lambda x: torch.relu_(x) + x, torch.nn.ReLU()),  # x, read again by name, is the ReLU's result
    (lambda x: x.relu(), torch.nn.ReLU()),
    (lambda x: F.leaky_relu(x, 0.2), torch.nn.LeakyReLU(0.2)),
    (lambda x: torch.sigmoid(x), torch.nn.Sigmoid()),
    (lambda x: F.hardtanh(x, 0., 6.), torch.nn.Hardtanh(0., 6.)),
])
@pytest.mark.parametrize('residual', ['captum', 'zennit'])
def test_functional_ops_become_modules(op, expected, residual):
    prepared = rewritten(op, residual)
    new = [module for module in called_modules(prepared) if type(module) is type(expected)]
    assert [repr(module) for module in new] == [repr(expected)]
    assert ops_passed_by_gradient(prepared) == []


@pytest.mark.parametrize('op', [
    lambda x: F.max_pool2d(x, 2, return_indices=True)[0],  # the gradient hands each window's relevance to its max
    lambda x: torch.cat(x.chunk(3, 1)[::-1], 1).permute(0, 2, 3, 1)[..., :2].reshape(2, -1),
    lambda x: F.pad(x, (1, 1)).transpose(2, 3).contiguous().view(2, -1).unsqueeze(1),
    # adding zero gives the tensor unchanged (timm's MobileOne blocks sum their branches from 0)
    lambda x: (0 + x) + 0. - 0, lambda x: x.add(0).sub(0), lambda x: torch.add(x, 0) + torch.sub(x, 0),
    lambda x: [x.add_(0), x][1],
])
def test_ops_that_move_or_select_values_pass_by_their_gradient(op):
    assert ops_passed_by_gradient(rewritten(op)) == []


@pytest.mark.parametrize('op, passed', [
    (lambda x: F.avg_pool2d(x, x.shape[-1]), 'avg_pool2d'),  # kernel computed from the input
    (lambda x: x.mean(1, dtype=torch.float32), 'Tensor.mean'),
    (lambda x: x * x, 'mul'),  # two signals, no gate
    (lambda x: 1 / x, 'truediv'),
    (lambda x: [view := x.flatten(1), torch.relu_(x), view][2], 'relu_'),  # a view taken before it is read after
    (lambda x: [x.add_(1.), x][1], 'Tensor.add'),  # x read by name after the write: out of place, adds a constant
    (lambda x: 0 - x, 'sub'),  # a zero minus the tensor negates it
    (lambda x: x + 1e-300, 'add'),  # any constant other than zero is a bias
    (lambda x: F.layer_norm(x, x.shape[1:]), 'layer_norm'),
])
def test_ops_without_a_rule_are_reported(op, passed):
    with pytest.warns(UserWarning, match=f'1 functional op\\(s\\) by their plain gradient.*: {passed} x1'):
        prepared = rewritten(op)
    assert [op_name(node) for node in ops_passed_by_gradient(prepared)] == [passed]


class HeldWeights(torch.nn.Module):
    '''Functional layers whose weights the model holds: a blur (a fixed depthwise filter held as a buffer, as in timm's
    BlurPool2d), a conv with a bias, relu, a transposed conv with output padding, a global mean, a product with a
    matrix and a linear layer.'''
    def __init__(self):
        super().__init__()
        self.register_buffer('blur', torch.tensor([1., 2., 1.]).outer(torch.tensor([1., 2., 1.])).expand(2, 1, 3, 3)
                             / 16, persistent=False)
        self.weight = torch.nn.Parameter(torch.randn(3, 2, 3, 3))
        self.bias = torch.nn.Parameter(torch.randn(3))
        self.up = torch.nn.Parameter(torch.randn(3, 2, 2, 2))  # (in, out / groups, *kernel)
        self.projection = torch.nn.Parameter(torch.randn(2, 3))
        self.fc_weight = torch.nn.Parameter(torch.randn(4, 3))
        self.fc_bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), self.blur, stride=2, groups=2)
        x = torch.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        x = F.conv_transpose2d(x, self.up, None, 2, 0, 1)
        return F.linear(x.mean((2, 3)) @ self.projection, weight=self.fc_weight, bias=self.fc_bias)


def prepared_as_model(model):
    ''':py:func:`lrp_graph` of a copy of ``model``, after checking that it computes what ``model`` does, bit for bit,
    on a ``(2, 2, 6, 6)`` input.'''
    input = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    prepared, _ = lrp_graph(copy.deepcopy(model))
    assert torch.equal(prepared(input), model(input))
    return prepared


def test_functional_layers_with_held_weights_become_layers():
    torch.manual_seed(0)
    model = HeldWeights().double().eval()
    prepared = prepared_as_model(model)
    layers = [module for module in called_modules(prepared) if not isinstance(module, (torch.nn.ReLU, SumReduction))]
    assert [repr(layer) for layer in layers] == [
        'Conv2d(2, 2, kernel_size=(3, 3), stride=(2, 2), groups=2, bias=False)',
        'Conv2d(2, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))',
        'ConvTranspose2d(3, 2, kernel_size=(2, 2), stride=(2, 2), output_padding=(1, 1), bias=False)',
        'Linear(in_features=2, out_features=3, bias=False)', 'Linear(in_features=3, out_features=4, bias=True)']
    assert ops_passed_by_gradient(prepared) == []
    # new parameter objects on the same values: a rule that rewrites one layer's weight changes no other tensor
    assert not any(layer.weight is tensor for layer in layers for tensor in prepared.parameters(recurse=False))
    assert torch.equal(layers[0].weight, model.blur) and not layers[0].weight.requires_grad
    assert torch.equal(layers[1].bias, model.bias) and layers[1].bias.requires_grad


MATMULS = {'@': operator.matmul, 'torch.matmul': torch.matmul, 'Tensor.matmul': lambda x, matrix: x.matmul(matrix),
           'torch.mm': torch.mm}


@pytest.mark.parametrize('op, shape', [
    pytest.param(MATMULS[name], shape, id=f'{name}-{len(shape)}d') for name in MATMULS
    for shape in ([(2, 3)] if name == 'torch.mm' else [(3,), (2, 3), (2, 5, 3)])])
def test_product_with_a_held_matrix_becomes_a_linear_layer(op, shape):
    model = Lambda(lambda self, x: op(x, self.matrix))
    model.matrix = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    input = torch.randn(*shape, dtype=torch.float64)
    prepared, _ = lrp_graph(model)
    assert torch.equal(prepared(input), model(input))
    assert [repr(layer) for layer in called_modules(prepared)] == ['Linear(in_features=3, out_features=4, bias=False)']
    assert ops_passed_by_gradient(prepared) == []


def test_product_of_a_held_matrix_with_a_signal_stays_functional():
    '''``W @ x`` mixes the signal along its first dims, which no Linear does.'''
    model = Lambda(lambda self, x: self.matrix @ x)
    model.matrix = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
    with pytest.warns(UserWarning, match=r'by their plain gradient.*: matmul x1'):
        lrp_graph(model)


class UnheldWeight(torch.nn.Module):
    '''A functional layer no torch.nn layer computes as it is: its weight computed in the forward, or a bias of
    another shape (F.linear broadcasts a scalar bias).'''
    def __init__(self, op):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 2, 1, 1))
        self.matrix = torch.nn.Parameter(torch.ones(2, 2))
        self.scalar = torch.nn.Parameter(torch.tensor(.5))
        self.vector = torch.nn.Parameter(torch.ones(2))
        self.op = op

    def forward(self, x):
        return self.op(self, x)


@pytest.mark.parametrize('op, passed', [
    (lambda self, x: F.conv2d(x, self.weight.expand(2, 2, 1, 1) * 2), 'conv2d'),
    (lambda self, x: F.linear(x, self.matrix, self.scalar), 'linear'),
    (lambda self, x: F.linear(x, self.vector), 'linear'),  # a weight of a rank nn.Linear cannot hold
])
def test_functional_layer_without_a_held_weight_is_reported(op, passed):
    model = UnheldWeight(op)
    with pytest.warns(UserWarning, match=f'1 functional op\\(s\\) by their plain gradient.*: {passed} x1'):
        prepared, _ = lrp_graph(model)
    assert [op_name(node) for node in ops_passed_by_gradient(prepared)] == [passed]
    input = torch.rand(1, 2, 3, 3) if passed == 'conv2d' else torch.rand(3, 2)
    assert torch.equal(prepared(input), model(input))


@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_functional_layers_with_held_weights_keep_the_identity(engine):
    '''LRP-epsilon with a negligible epsilon equals gradient x input: the functional layers got the epsilon rule
    (passing relevance by their plain gradient breaks it: the blur's gradient is no relevance).'''
    torch.manual_seed(0)
    model = HeldWeights().double().eval()
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    output = model(input)
    target = output.argmax().item()
    expected = torch.autograd.grad(output[0, target], input)[0] * input
    if engine == 'fused':
        lrp = FusedLRP(model, rules={key: EpsilonRule(1e-15) for key in (
            torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, SumReduction)})
    else:
        lrp = epsilon(engine, model)
    relevance = lrp.attribute(input.detach(), target=target)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)


class Gated(torch.nn.Module):
    '''conv -> relu -> squeeze-and-excitation gate -> * 0.5 -> / 4 -> layer scale -> global mean -> linear, every
    layer without a bias (so LRP-epsilon conserves relevance exactly).'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, bias=False)
        self.squeeze = torch.nn.Conv2d(4, 4, 1, bias=False)
        self.gamma = torch.nn.Parameter(torch.rand(1, 4, 1, 1) + .5)
        self.fc = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x * torch.sigmoid(self.squeeze(x.mean((2, 3), keepdim=True)))
        x = 0.5 * x / 4 * self.gamma
        return self.fc(x.mean((2, 3)))


def epsilon(engine, model):
    '''LRP-epsilon (epsilon 1e-15) on every layer with FusedLRP or CompositeLRP.'''
    if engine == 'fused':
        return FusedLRP(model, rules={torch.nn.Conv2d: EpsilonRule(1e-15), torch.nn.Linear: EpsilonRule(1e-15),
                                      SumReduction: EpsilonRule(1e-15), Addition_Module: EpsilonRule(1e-15)})
    return CompositeLRP(model, LayerMapComposite(layer_map_base(1e-15) + [
        (Convolution, Epsilon(1e-15)), (torch.nn.Linear, Epsilon(1e-15))]))


def test_products_with_constants_and_gates_pass_relevance_to_the_signal():
    torch.manual_seed(0)
    prepared, _ = lrp_graph(Gated().double().eval())
    products = [node for node in prepared.graph.nodes if node.target is scale_passing_relevance]
    # the gate, 0.5 *, / 4, * gamma
    assert [node.args[2] for node in products] == [False, False, True, False]
    assert ops_passed_by_gradient(prepared) == []


@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_gated_relevance_is_conserved(engine):
    # the gate branch gets no relevance and the constants none either, so without biases the input relevance sums
    # to the output; by the plain gradient of the products it sums to about 0.5 / 4 * gamma * gate of it
    torch.manual_seed(0)
    model = Gated().double().eval()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    relevance, delta = epsilon(engine, model).attribute(input, target=1, return_convergence_delta=True)
    output = model(input)[:, 1]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), output, rtol=1e-10, atol=0)
    assert delta.abs().max() < 1e-10 * output.abs().max()


class Chained(torch.nn.Module):
    '''Two residual additions in a row (MobileNetV2 and EfficientNet stages), the second adding to the first.'''
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(3, 3, 1)
        self.second = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


@pytest.mark.parametrize('residual, add_type', [('captum', Addition_Module), ('zennit', Sum)])
def test_chained_residual_additions_all_become_modules(residual, add_type):
    prepared, _ = lrp_graph(Chained(), residual=residual)
    assert [type(module) for module in called_modules(prepared)].count(add_type) == 2
    assert ops_passed_by_gradient(prepared) == []


class Concatenated(torch.nn.Module):
    '''A tensor read by a conv and by a torch.cat (DLA's trees, DenseNet's blocks).'''
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.second = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.relu(self.first(x))
        x = torch.cat([x, self.second(x)], 1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_tensor_read_by_a_module_and_by_cat_keeps_the_identity(engine):
    # torch.cat passes relevance by its gradient, which hands each part its own; Captum hooks the conv's input
    # tensor, which the cat reads too: without a clone per module the hook rescales the cat's relevance as if it
    # were a gradient
    torch.manual_seed(0)
    model = Concatenated().double().eval()
    input = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    gradient, = torch.autograd.grad(model(input)[0, 1], input)
    relevance = epsilon(engine, model).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, gradient * input.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('single_pass', [False, True])
def test_composite_on_functional_reductions(single_pass):
    # Zennit's Norm on a MeanReduction equals Zennit's Norm on the AdaptiveAvgPool2d it replaces
    torch.manual_seed(0)
    model = Functional(lambda x: torch.relu(x).mean((2, 3))).double().eval()
    pooled = Functional(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))).double().eval()
    pooled.load_state_dict(model.state_dict())
    input = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    actual = CompositeLRP(model, EpsilonPlusFlat(), single_pass=single_pass).attribute(input, target=0)
    expected = CompositeLRP(pooled, EpsilonPlusFlat(), single_pass=single_pass).attribute(input, target=0)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_number_arguments_are_not_signals():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x, scale=1.):
            y = self.fc(x)
            return scale * y + (y + scale)

    # scale * y is y scaled by a constant, y + scale adds a constant (reported), the outer + is a residual
    with pytest.warns(UserWarning, match=r'1 functional op\(s\) by their plain gradient.*: add x1'):
        prepared, _ = lrp_graph(Scaled())
    assert [node.target for node in prepared.graph.nodes].count(scale_passing_relevance) == 1
    assert [type(module) for module in called_modules(prepared)] == [torch.nn.Linear, Addition_Module]


class ChainedLinear(torch.nn.Module):
    '''Two residual additions of linear layers, the second adding to the first.'''
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        summed = self.first(x) + self.second(x)
        return summed + self.first(summed)


@pytest.mark.parametrize('residual', ['captum', 'zennit', 'operands'])
def test_every_residual_kind_makes_additions_modules(residual):
    # including an addition of a residual sum
    prepared, _ = lrp_graph(ChainedLinear(), residual=residual)
    kinds = {'captum': Addition_Module, 'zennit': Sum, 'operands': AddOperands}
    assert sum(type(module) is kinds[residual] for module in prepared.modules()) == 2
    assert not [node for node in prepared.graph.nodes if node.target in (operator.add, torch.add)]


class WrittenInPlace(torch.nn.Module):
    '''A residual sum written ``hidden += branch(hidden)`` (``hidden + branch(hidden)`` without ``in_place``); with
    ``read``, a tensor sharing the written memory is read after the write: ``'view'`` a view taken before it,
    ``'base'`` the tensor whose view is written into.'''
    def __init__(self, read=None, in_place=True):
        super().__init__()
        self.read, self.in_place = read, in_place
        self.conv, self.branch = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1)
        self.linear = torch.nn.Linear(72, 3)

    def forward(self, x):
        hidden = self.conv(x)
        flat = hidden.flatten(1)
        written = hidden[:, :1] if self.read == 'base' else hidden
        if self.in_place:
            written += self.branch(hidden)[:, :written.shape[1]]
        else:
            written = written + self.branch(hidden)[:, :written.shape[1]]
        return self.linear(torch.relu(flat if self.read else written.flatten(1)))


def test_in_place_sum_after_its_operands_are_read_becomes_a_module():
    torch.manual_seed(0)
    prepared = prepared_as_model(WrittenInPlace().double().eval())
    assert ops_passed_by_gradient(prepared) == []
    assert [type(module) for module in called_modules(prepared)].count(Addition_Module) == 1


@pytest.mark.parametrize('read', ['view', 'base'])
def test_in_place_op_whose_memory_is_read_later_stays_in_place(read):
    '''Made an op with a new output, the add would leave ``flat`` without the sum: the graph module would compute
    something else than the model.'''
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r'plain gradient.*: iadd x1'):
        prepared_as_model(WrittenInPlace(read).double().eval())


@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_in_place_sum_keeps_the_identity(engine):
    '''LRP-epsilon with a negligible epsilon equals gradient x input where the residual sum is written in place
    (CompositeLRP raised autograd's in-place error, FusedLRP passed the sum's relevance by its gradient).'''
    torch.manual_seed(0)
    model = WrittenInPlace().double().eval()
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    reference = WrittenInPlace(in_place=False).double().eval()
    reference.load_state_dict(model.state_dict())
    output = reference(input)  # autograd cannot differentiate the model: the branch keeps the input the add changes
    expected = torch.autograd.grad(output[0, 1], input)[0] * input
    relevance = epsilon(engine, model).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)


class PromotedInPlace(torch.nn.Module):
    '''A float32 residual sum ``hidden += branch(hidden)`` whose branch computes in float64: in place, the sum
    stays float32.'''
    def __init__(self):
        super().__init__()
        self.conv, self.linear = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Linear(72, 3)
        self.branch = torch.nn.Conv2d(2, 2, 3, padding=1).double()

    def forward(self, x):
        hidden = self.conv(x)
        hidden += self.branch(hidden.double())
        return self.linear(hidden.flatten(1))


@pytest.mark.parametrize('engine', ['fused', 'fused-captum', 'composite', 'composite-zennit'])
def test_in_place_op_made_out_of_place_keeps_the_dtype_it_writes_into(engine):
    '''Out of place, ``hidden + branch`` was float64, and the float32 linear layer after it raised.'''
    torch.manual_seed(0)
    model = PromotedInPlace().eval()
    input = torch.rand(2, 2, 6, 6)
    prepared, _ = lrp_graph(copy.deepcopy(model))
    assert torch.equal(prepared(input), model(input))
    kind, _, own = engine.partition('-')
    lrp = (FusedLRP(model, engine=own or 'singlepass') if kind == 'fused'
           else CompositeLRP(model, EpsilonPlusFlat(), engine=own or 'singlepass'))
    relevance, delta = lrp.attribute(input, target=1, return_convergence_delta=True)
    assert relevance.dtype == torch.float32 and relevance.shape == input.shape


class Tempered(torch.nn.Module):
    '''conv -> relu -> residual conv -> linear, with a temperature its forward hook divides the logits by.'''
    def __init__(self):
        super().__init__()
        self.conv, self.residual = torch.nn.Conv2d(2, 2, 3), torch.nn.Conv2d(2, 2, 3, padding=1)
        self.linear, self.temperature = torch.nn.Linear(32, 3), 2.

    def forward(self, x):
        hidden = torch.relu(self.conv(x))
        return self.linear((hidden + self.residual(hidden)).flatten(1))


@pytest.mark.parametrize('engine', ['fused', 'fused-captum', 'composite', 'composite-zennit'])
def test_forward_hooks_on_the_model_itself_run_on_the_prepared_copy(engine):
    '''The GraphModule dropped them: the copy computed logits twice the model's, and the convergence delta, taken on
    the copy, did not show it.'''
    torch.manual_seed(0)
    model = Tempered().double().eval()
    model.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] * .5,), kwargs), with_kwargs=True)
    model.register_forward_hook(lambda module, args, output: output / module.temperature)
    input = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    kind, _, own = engine.partition('-')
    lrp = (FusedLRP(model, engine=own or 'singlepass') if kind == 'fused'
           else CompositeLRP(model, EpsilonPlusFlat(), engine=own or 'singlepass'))
    with pytest.warns(UserWarning, match='Tempered has forward hooks .* registered on the model itself'):
        relevance, delta = lrp.attribute(input, target=1, return_convergence_delta=True)
    torch.testing.assert_close(relevance.sum((1, 2, 3)) + delta, model(input)[:, 1], rtol=1e-12, atol=1e-12)


class InPlaceModules(torch.nn.Module):
    '''``kind='relu'``: a ReLU(inplace=True) whose result the forward drops, reading the rectified tensor by name;
    ``'flatten'``: a Flatten module's view of a tensor that ``+=`` writes into after; ``'view'``: an in-place ReLU
    whose write a view taken before it reads. ``rebound``: the ReLU's result is read, out of place (a reference that
    autograd can differentiate).'''
    def __init__(self, kind, rebound=False):
        super().__init__()
        self.kind, self.rebound = kind, rebound
        self.conv, self.shortcut = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 1, padding=0)
        self.relu, self.flatten, self.head = torch.nn.ReLU(inplace=True), torch.nn.Flatten(), torch.nn.Linear(72, 3)

    def forward(self, x):
        hidden = self.conv(x)
        if self.kind == 'flatten':
            flat = self.flatten(hidden)
            hidden += self.shortcut(hidden)
            return self.head(flat)
        view = hidden.flatten(1)
        shortcut = self.shortcut(hidden)
        if self.rebound:
            hidden = torch.relu(hidden)
        else:
            self.relu(hidden)
        return self.head(view if self.kind == 'view' else (hidden + shortcut).flatten(1))


@pytest.mark.parametrize('kind', ['relu', 'flatten'])
@pytest.mark.parametrize('residual', ['captum', 'operands'])
def test_in_place_modules_keep_the_models_function(kind, residual):
    '''FusedLRP's copy gave each reader of a shared tensor a clone, so the in-place ReLU rectified a clone and the
    Flatten viewed one (0.12 and 0.26 off the model's output).'''
    torch.manual_seed(0)
    model = InPlaceModules(kind).double().eval()
    input = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    prepared, _ = lrp_graph(copy.deepcopy(model), residual=residual)
    assert torch.equal(prepared(input), model(input))
    # the ReLU's write is read by name only: its readers read its result, and it writes into a new tensor
    assert not any(getattr(module, 'inplace', False) for module in prepared.modules())


@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_in_place_relu_read_by_name_keeps_the_identity(engine):
    torch.manual_seed(0)
    model = InPlaceModules('relu').double().eval()
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    reference = InPlaceModules('relu', rebound=True).double().eval()
    reference.load_state_dict(model.state_dict())
    output = reference(input)
    expected = torch.autograd.grad(output[0, 1], input)[0] * input
    relevance = epsilon(engine, model).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)


def test_in_place_module_whose_write_a_view_reads_is_kept_with_a_warning():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r'1 module\(s\) with inplace=True write into a tensor that the forward reads '
                                         r'again through a view taken before \(first: `relu`\)'):
        prepared = prepared_as_model(InPlaceModules('view').double().eval())
    assert prepared.relu.inplace


class ReadAfterTheWrite(torch.nn.Module):
    '''A ReLU(inplace=True) whose result the forward drops, then reads the rectified tensor through a view made after
    it (``'view'``) or in a residual sum (``'sum'``; ``'clamp'``: after an in-place clamp); ``rebound``: the ReLU's
    result read out of place (a reference autograd can differentiate).'''
    def __init__(self, kind, rebound=False):
        super().__init__()
        self.kind, self.rebound = kind, rebound
        self.conv, self.branch = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1)
        self.relu, self.head = torch.nn.ReLU(inplace=True), torch.nn.Linear(108, 3)

    def forward(self, x):
        hidden = self.conv(x)
        if self.rebound:
            hidden = torch.relu(hidden).clamp(max=100.) if self.kind == 'clamp' else torch.relu(hidden)
        else:
            self.relu(hidden)
            if self.kind == 'clamp':
                hidden.clamp_(max=100.)
        return self.head(hidden.flatten(1) if self.kind == 'view' else (self.branch(hidden) + hidden).flatten(1))


@pytest.mark.parametrize('kind', ['view', 'sum', 'clamp'])
@pytest.mark.parametrize('engine', ['fused', 'composite', 'composite-zennit'])
def test_in_place_module_read_after_the_write_through_new_tensors_keeps_the_identity(kind, engine):
    '''Tensors made after the write from the written one read it through the ReLU's result: the ReLU writes into a
    new tensor. It stayed in place (with a warning blaming a view taken before), and Zennit's hooks, which hand it a
    copy, explained another function (0.59 and 0.80 relative off gradient x input).'''
    torch.manual_seed(0)
    model = ReadAfterTheWrite(kind).double().eval()
    reference = ReadAfterTheWrite(kind, rebound=True).double().eval()
    reference.load_state_dict(model.state_dict())
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - .3
    input.requires_grad_(True)
    expected = torch.autograd.grad(reference(input)[0, 1], input)[0] * input
    if engine == 'composite-zennit':
        lrp = CompositeLRP(model, LayerMapComposite(layer_map_base(1e-15) + [
            (Convolution, Epsilon(1e-15)), (torch.nn.Linear, Epsilon(1e-15))]), engine='zennit')
    else:
        lrp = epsilon(engine, model)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*inplace=True')  # nothing stays in place
        relevance = lrp.attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)
    prepared = lrp.prepared.get()
    assert not any(getattr(module, 'inplace', False) for module in prepared.modules())
    assert not any(writes_in_place(node) for node in prepared.graph.nodes)  # clamp_ is clamp


class SharedByDropout(torch.nn.Module):
    '''A tensor read by a Dropout (the identity in eval mode) and by a second layer.'''
    def __init__(self):
        super().__init__()
        self.conv, self.drop = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Dropout(.5)
        self.first, self.second = torch.nn.Linear(108, 3), torch.nn.Linear(108, 3)

    def forward(self, x):
        hidden = torch.relu(self.conv(x)).flatten(1)
        return self.first(self.drop(hidden)) + self.second(hidden)


def test_dropout_reading_a_shared_tensor_gets_its_own_copy_for_captum():
    '''Captum hooks a rule-less module's input tensor itself; without a clone of its own, the Dropout's hook replaced
    the relevance the second layer handed back (0.83 relative off gradient x input).'''
    torch.manual_seed(0)
    model = SharedByDropout().double().eval()
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(model(input)[0, 1], input)[0] * input
    relevance = epsilon('fused', model).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)


class ResultReadsOriginal(torch.nn.Module):
    '''``y = h.relu_()`` then an op on ``y`` that also reads ``h`` (the same tensor in the model): ``y.add_(h)``
    (``'method'``) or ``y += h`` (``'augmented'``); ``rebound``: ``2 * relu(h)`` written out of place.'''
    def __init__(self, kind, rebound=False):
        super().__init__()
        self.kind, self.rebound = kind, rebound
        self.conv, self.head = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Linear(108, 3)

    def forward(self, x):
        hidden = self.conv(x)
        if self.rebound:
            result = torch.relu(hidden)
            result = result + result
        else:
            result = hidden.relu_()
            if self.kind == 'method':
                result.add_(hidden)
            else:
                result += hidden
        return self.head(result.flatten(1))


@pytest.mark.parametrize('kind', ['method', 'augmented'])
@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_op_on_the_result_that_reads_the_written_tensor_reads_the_result(kind, engine):
    '''The rewrite made relu_ out of place but left the add reading the tensor before the ReLU: relu(h) + h, 1.07 off
    the model's output.'''
    torch.manual_seed(0)
    model = ResultReadsOriginal(kind).double().eval()
    reference = ResultReadsOriginal(kind, rebound=True).double().eval()
    reference.load_state_dict(model.state_dict())
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - .3
    prepared_as_model(model)
    input.requires_grad_(True)
    expected = torch.autograd.grad(reference(input)[0, 1], input)[0] * input
    relevance = epsilon(engine, model).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)
