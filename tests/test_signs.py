'''Tests for the sign analysis: which module inputs of a traced forward cannot be negative.'''
import pytest
import torch
import torch.fx
import torch.nn.functional as F

from zennit_bnfuse.aliasing import writes_in_place
from zennit_bnfuse.graph_layers import AddOperands
from zennit_bnfuse.layers import ThresholdReLU
from zennit_bnfuse.signs import NON_NEGATIVE, SIGNED, UNKNOWN, SignAnalysis


def input_signs(model):
    '''The sign of each called module's input, by name.'''
    graph = torch.fx.Tracer().trace(model)
    return SignAnalysis(graph, model).module_inputs()


class Layers(torch.nn.Module):
    '''Probes (Identity modules) after the operations whose output sign is tested.'''
    def __init__(self, forward):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.threshold = ThresholdReLU(torch.ones(2), torch.zeros(2))
        self.add = AddOperands()
        self.probe = torch.nn.ModuleList(torch.nn.Identity() for _ in range(6))
        self.function = forward

    def forward(self, x):
        return self.function(self, x)


def signs_of(forward):
    '''The signs of the probes' inputs, in order, for a forward ``(self, x) -> ...``.'''
    signs = input_signs(Layers(forward))
    return [signs.get(f'probe.{index}') for index in range(6) if f'probe.{index}' in signs]


def test_the_model_input_is_unknown_and_a_conv_output_signed():
    assert input_signs(Layers(lambda self, x: self.conv(x))) == {'conv': UNKNOWN}
    assert signs_of(lambda self, x: self.probe[0](self.conv(x))) == [SIGNED]


def test_activations_and_what_keeps_them_non_negative():
    def forward(self, x):
        relu = self.relu(self.conv(x))
        self.probe[0](relu)
        self.probe[1](self.pool(relu))
        self.probe[2](torch.cat([relu, self.threshold(x)], dim=1))
        self.probe[3](self.add(relu, F.relu(x)))
        self.probe[4](torch.flatten(F.adaptive_avg_pool2d(relu, 1), 1) * 2.)
        return self.probe[5](relu.clamp(min=0.5))
    assert signs_of(forward) == [NON_NEGATIVE] * 6


def test_mixing_in_a_signed_tensor_or_a_negative_constant_gives_signed():
    def forward(self, x):
        relu, conv = self.relu(x), self.conv(x)
        self.probe[0](torch.cat([relu, conv], dim=1))
        self.probe[1](self.add(relu, conv))
        self.probe[2](relu * -1.)
        self.probe[3](relu - 1.)
        self.probe[4](torch.tanh(relu))
        return self.probe[5](relu + x)  # x, the model's input, is unknown
    assert signs_of(forward) == [SIGNED] * 5 + [UNKNOWN]


def test_average_pooling_with_a_divisor_that_may_be_negative_gives_signed():
    # a negative divisor_override flips the sign: SinglePass skipped the negative half of z+ after it (110x off Zennit)
    def forward(self, x):
        relu = self.relu(x)
        self.probe[0](F.avg_pool2d(relu, 2, divisor_override=-4))
        self.probe[1](F.avg_pool2d(relu, 2, 2, 0, False, True, -4))
        self.probe[2](F.avg_pool2d(relu, 2, divisor_override=x.shape[-1] - 9))  # computed: may be negative
        self.probe[3](self.negating(relu))
        self.probe[4](F.avg_pool2d(relu, 2, divisor_override=4))
        return self.probe[5](self.averaging(relu))
    model = Layers(forward)
    model.negating, model.averaging = torch.nn.AvgPool2d(2, divisor_override=-4), torch.nn.AvgPool2d(2)
    signs = input_signs(model)
    assert [signs[f'probe.{index}'] for index in range(6)] == [SIGNED] * 4 + [NON_NEGATIVE] * 2


def test_softplus_with_a_negative_beta_and_clamp_with_max_below_min_give_signed_or_unknown():
    # softplus with beta < 0 is never positive; clamp(x, 0, -1) is -1 everywhere: both counted as non-negative
    def forward(self, x):
        relu = self.relu(x)
        self.probe[0](F.softplus(relu, beta=-1.))
        self.probe[1](self.negative(relu))
        self.probe[2](torch.clamp(relu, 0., -1.))
        self.probe[3](torch.clamp(relu, 0., 2.))
        return self.probe[4](F.softplus(x, 2.))
    model = Layers(forward)
    model.negative = torch.nn.Softplus(beta=-1.)
    signs = input_signs(model)
    assert [signs[f'probe.{index}'] for index in range(5)] == [SIGNED, SIGNED, UNKNOWN, NON_NEGATIVE, NON_NEGATIVE]


def test_softplus_with_a_negative_threshold_gives_signed():
    '''Softplus returns x itself where beta * x > threshold: negative entries for a negative threshold and a signed
    input. SinglePass skipped the negative half of z+ after it (4x off Zennit).'''
    def forward(self, x):
        conv, relu = self.conv(x), self.relu(x)
        self.probe[0](F.softplus(conv, 1., -3.))
        self.probe[1](self.negative(conv))
        self.probe[2](F.softplus(conv, threshold=x.shape[-1] - 9))  # computed: may be negative
        self.probe[3](F.softplus(conv, threshold=0.))
        self.probe[4](self.negative(relu))  # x or log(1 + exp(x)): non-negative where x is
        return self.probe[5](F.softplus(relu, threshold=x.shape[-1] - 9))
    model = Layers(forward)
    model.negative = torch.nn.Softplus(threshold=-3.)
    signs = input_signs(model)
    assert [signs[f'probe.{index}'] for index in range(6)] == [SIGNED] * 3 + [NON_NEGATIVE] * 3
    input = torch.linspace(-2, 0, 5)
    assert (F.softplus(input, 1., -3.) < 0).any()  # the premise


def test_add_with_alpha_counts_alpha_as_an_operand():
    # torch.add(a, b, alpha=-1) is a - b: signed although both operands are non-negative
    def forward(self, x):
        relu, other = self.relu(x), F.relu(self.conv(x))
        self.probe[0](torch.add(relu, other, alpha=-1))
        self.probe[1](relu.add(other, alpha=-2.))
        self.probe[2](torch.add(relu, other, alpha=2))
        self.probe[3](relu.div(other + 1., rounding_mode='floor'))
        return self.probe[4](torch.add(relu, other, alpha=True))  # not a number: unknown
    assert signs_of(forward) == [SIGNED, SIGNED, NON_NEGATIVE, NON_NEGATIVE, UNKNOWN]
    # in place into a non-negative tensor: the analysis gives up
    model = Layers(lambda self, x: self.probe[0](self.relu(x).add_(F.relu(self.conv(x)), alpha=-1)))
    assert SignAnalysis(torch.fx.Tracer().trace(model), model).gave_up is not None


@pytest.mark.parametrize('write', [
    lambda relu: relu.__setitem__(0, -1.), lambda relu: torch.sub(relu, 2., out=relu),
    lambda relu: relu.ravel().sub_(2.)], ids=['setitem', 'out', 'through-ravel'])
def test_writes_into_a_non_negative_tensor_are_seen(write):
    '''``x[i] = v``, ``out=`` and a write through a view no list named were not seen: the probe's input counted as
    non-negative, so z+ would have skipped its negative half.'''
    model = Layers(lambda self, x: [relu := self.relu(x), write(relu), self.probe[0](relu)][2])
    assert SignAnalysis(torch.fx.Tracer().trace(model), model).gave_up is not None


def test_an_unknown_function_gives_unknown():
    assert signs_of(lambda self, x: self.probe[0](torch.erf(self.relu(x)))) == [UNKNOWN]


def test_broadcast_operands_keep_their_own_sign():
    def forward(self, x):
        left, right = torch.broadcast_tensors(self.relu(x), self.conv(x))
        self.probe[0](left)
        return self.probe[1](right)
    assert signs_of(forward) == [NON_NEGATIVE, SIGNED]


def test_a_module_called_twice_is_non_negative_only_if_both_inputs_are():
    def forward(self, x):
        self.probe[0](self.relu(x))
        return self.probe[0](self.conv(x))
    assert signs_of(forward) == [SIGNED]


def test_writing_negative_values_in_place_into_non_negative_memory_gives_up():
    def forward(self, x):
        relu = self.relu(x)
        view = relu.view(-1)
        view.sub_(1.)
        return self.probe[0](relu)
    model = Layers(forward)
    analysis = SignAnalysis(torch.fx.Tracer().trace(model), model)
    assert analysis.gave_up is not None and 'in place' in analysis.gave_up
    assert set(analysis.module_inputs().values()) == {UNKNOWN}


def test_in_place_activations_and_in_place_writes_into_signed_memory_are_fine():
    def forward(self, x):
        conv = self.conv(x)
        conv.mul_(-2.)  # signed memory stays signed
        relu = F.relu(conv, inplace=True)  # ... and is non-negative from here on
        return self.probe[0](relu)
    model = Layers(forward)
    analysis = SignAnalysis(torch.fx.Tracer().trace(model), model)
    assert analysis.gave_up is None
    assert analysis.module_inputs()['probe.0'] == NON_NEGATIVE
    # an in-place write into memory that a non-negative tensor shares (the in-place ReLU's) gives up
    model = Layers(lambda self, x: self.probe[0](F.relu(self.conv(x), inplace=True).sub_(1.)))
    assert SignAnalysis(torch.fx.Tracer().trace(model), model).gave_up is not None


def test_writes_in_place():
    # the one test of in-place ops, shared by the sign analysis and the LRP graph's warning
    def forward(self, x):
        y = self.conv(x)
        y.add_(1.)
        z = y & y  # operator.and_: a name that ends in '_', not in place
        torch.relu_(z)
        F.relu(z, inplace=1)
        return self.probe[0](F.relu(z))  # a module: never in place
    graph = torch.fx.Tracer().trace(Layers(forward))
    calls = [node for node in graph.nodes if node.op in ('call_function', 'call_method', 'call_module')][1:]
    assert [writes_in_place(node) for node in calls] == [True, False, True, True, False, False]
