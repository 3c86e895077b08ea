'''Tests for the fused modules in zennit_bnfuse.layers.'''
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon, ZPlus

from zennit_bnfuse.layers import (
    BiasMapConv2d, FoldedConv1d, FoldedConv2d, FoldedConvTranspose2d, FoldedInputError, FoldedLinear, ThresholdReLU,
    detached_copy, folded_layer, needs_bias_map,
)


def shift_only(channels, shift):
    '''``(scale, shift)`` of an affine map with unit scale.'''
    return torch.ones(channels, dtype=torch.float64), torch.full((channels,), shift, dtype=torch.float64)


def test_bias_map_counts_taps_inside_the_image():
    # 3x3 all-ones kernel, zero padding 1, input shift 1: the bias at each output position is the number of kernel
    # taps that fall inside the 4x4 image (4 in corners, 6 on edges, 9 inside)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    conv.weight.data.fill_(1.)
    fused = folded_layer(conv, before=shift_only(1, 1.))
    assert isinstance(fused, BiasMapConv2d)
    output = fused(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    expected = torch.tensor([[4., 6., 6., 4.], [6., 9., 9., 6.], [6., 9., 9., 6.], [4., 6., 6., 4.]])
    assert torch.equal(output[0, 0], expected.double())
    assert fused.bias.shape == (1, 4, 4)


def test_bias_map_rebuilt_for_new_input_size():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    conv.weight.data.fill_(1.)
    fused = folded_layer(conv, before=shift_only(1, 1.))
    fused(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    output = fused(torch.zeros(1, 1, 2, 3, dtype=torch.float64))
    assert torch.equal(output[0, 0], torch.tensor([[4., 6., 4.], [4., 6., 4.]], dtype=torch.float64))
    assert fused.bias_map_input_size == (2, 3)


@pytest.mark.parametrize('padding_mode', ['reflect', 'replicate', 'circular'])
def test_non_zero_padding_keeps_constant_bias(padding_mode):
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode=padding_mode, bias=False).double()
    conv.weight.data.fill_(1.)
    fused = folded_layer(conv, before=shift_only(1, 1.))
    assert type(fused) is FoldedConv2d
    assert torch.equal(fused.bias, torch.tensor([9.], dtype=torch.float64))


def test_needs_bias_map():
    assert needs_bias_map(torch.nn.Conv1d(1, 1, 3, padding=1))
    assert needs_bias_map(torch.nn.Conv2d(1, 1, 3, padding='same'))
    assert not needs_bias_map(torch.nn.Conv2d(1, 1, 1, padding='same'))
    assert not needs_bias_map(torch.nn.Conv2d(1, 1, 3, padding='valid'))
    assert not needs_bias_map(torch.nn.Conv3d(1, 1, 3))
    assert not needs_bias_map(torch.nn.Linear(2, 2))


def test_threshold_relu_hand_computed():
    activation = ThresholdReLU(torch.tensor([1., -1., 0.]), torch.tensor([-1., 1., 2.]))
    input = torch.tensor([[3., 3., 3.], [-3., -3., -3.]])[:, :, None]
    expected = torch.tensor([[2., 0., 2.], [0., 4., 2.]])[:, :, None]
    assert torch.equal(activation(input), expected)
    # the threshold is a bias: Zennit's composites must not treat the module as an activation (Pass)
    from zennit.types import Activation
    assert not isinstance(activation, (torch.nn.ReLU, Activation))


def test_folded_layer_leaves_layer_untouched():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    conv.register_forward_hook(lambda *args: None)
    weight, bias = conv.weight, conv.bias
    state = {key: value.clone() for key, value in conv.state_dict().items()}
    fused = folded_layer(conv, before=shift_only(2, .5))
    assert conv.weight is weight and conv.bias is bias
    assert all(torch.equal(value, state[key]) for key, value in conv.state_dict().items())
    assert len(conv._forward_hooks) == 1 and not fused._forward_hooks
    assert fused.weight is not weight


def test_detached_copy_shares_nothing():
    linear = torch.nn.Linear(2, 2)
    linear.register_forward_pre_hook(lambda *args: None)
    new = detached_copy(linear)
    assert new.weight is None and new.bias is None
    assert not new._forward_pre_hooks and len(linear._forward_pre_hooks) == 1
    assert new.in_features == 2


def test_folded_transposed_input_side_raises():
    with pytest.raises(TypeError, match='transposed'):
        folded_layer(torch.nn.ConvTranspose2d(1, 1, 3).double(), before=shift_only(1, 1.))


def test_folded_layers_keep_their_torch_type():
    linear = folded_layer(torch.nn.Linear(2, 1).double(), before=shift_only(2, 1.), name='fc', batch_norms=('bn',))
    transposed = folded_layer(torch.nn.ConvTranspose2d(1, 2, 3).double(), after=torch.nn.BatchNorm2d(2).eval())
    assert type(linear) is FoldedLinear and isinstance(linear, torch.nn.Linear)
    assert type(transposed) is FoldedConvTranspose2d and isinstance(transposed, torch.nn.ConvTranspose2d)
    assert (linear.folded_layer_name, linear.folded_batch_norms) == ('fc', ('bn',))


def test_folded_linear_takes_two_dim_input_only():
    # W = [[1, 2]], shift 1 per input feature: bias 3; on (N, features) the fold is exact
    linear = torch.nn.Linear(2, 1, bias=False).double()
    linear.weight.data.copy_(torch.tensor([[1., 2.]]))
    fused = folded_layer(linear, before=shift_only(2, 1.), name='head.fc', batch_norms=('head.bn',))
    assert torch.equal(fused(torch.ones(1, 2, dtype=torch.float64)), torch.tensor([[6.]], dtype=torch.float64))
    with pytest.raises(FoldedInputError, match=r"`head\.fc` \(Linear\) has BatchNorm `head\.bn` folded into it.*"
                       r"2-D inputs \(N, features\).*shape \(1, 2, 2\).*handling='unfused'.*example_inputs") as error:
        fused(torch.ones(1, 2, 2, dtype=torch.float64))
    assert isinstance(error.value, ValueError) and (error.value.layer, error.value.shape) == ('head.fc', (1, 2, 2))


def test_folded_conv_takes_batched_input_only():
    fused = folded_layer(torch.nn.Conv1d(2, 2, 1).double(), after=torch.nn.BatchNorm1d(2).double().eval(), name='c')
    assert type(fused) is FoldedConv1d
    assert fused(torch.ones(1, 2, 3, dtype=torch.float64)).shape == (1, 2, 3)
    with pytest.raises(FoldedInputError, match=r"`c` \(Conv1d\).*3-D inputs \(N, C, \*spatial\).*shape \(2, 3\)"):
        fused(torch.ones(2, 3, dtype=torch.float64))


def bias_map_conv():
    '''A 3x3 zero-padded conv with a BN shift of 1 folded into its input: a bias map counting the taps inside.'''
    conv = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False).double()
    conv.weight.data.copy_(torch.tensor([1., -1.], dtype=torch.float64)[:, None, None, None].expand(2, 1, 3, 3))
    return folded_layer(conv, before=shift_only(1, 1.))


def test_bias_map_state_dict_keys_do_not_change_when_run():
    fused = bias_map_conv()
    keys = list(fused.state_dict())
    fused(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    assert isinstance(fused.bias, torch.nn.Parameter) and 'bias' in dict(fused.named_parameters())
    assert list(fused.state_dict()) == keys == ['weight', 'border_kernel', 'base_bias']


def test_bias_map_state_loads_into_a_copy_that_has_not_run():
    ran, fresh = bias_map_conv(), bias_map_conv()
    ran(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    with torch.no_grad():
        ran.base_bias.fill_(10.)
    fresh.load_state_dict(ran.state_dict())
    # a state_dict saved with the map in it (as before it was kept out) loads too; the map is rebuilt from the buffers
    ran.load_state_dict({**ran.state_dict(), 'bias': torch.zeros(2, 4, 4, dtype=torch.float64)})
    corner = torch.tensor([10. + 4., 10. - 4.], dtype=torch.float64)
    for module in (fresh, ran):
        assert module.bias is None
        assert torch.equal(module(torch.zeros(1, 1, 4, 4, dtype=torch.float64))[0, :, 0, 0], corner)


def relevance_under(rule, layer, input):
    '''Zennit relevance of ``input`` through the one-layer model ``layer`` under ``rule``, output relevance 1.'''
    model = torch.nn.Sequential(layer)
    with Gradient(model, LayerMapComposite([(torch.nn.Conv2d, rule)])) as attributor:
        _, relevance = attributor(input, torch.ones_like(model(input)))
    return relevance


@pytest.mark.parametrize('rule', [Epsilon, ZPlus])
def test_zennit_rules_treat_the_bias_map_as_bias(rule):
    # with the bias zeroed, the bias-map conv is its weight alone: the relevance of a conv without bias
    fused = bias_map_conv()
    plain = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False).double()
    plain.weight.data.copy_(fused.weight.data)
    input = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - .3
    expected = relevance_under(rule(zero_params='bias'), plain, input)
    torch.testing.assert_close(relevance_under(rule(zero_params='bias'), fused, input), expected, rtol=1e-12, atol=0)
    assert not torch.allclose(relevance_under(rule(), fused, input), expected)
    assert list(fused.state_dict()) == ['weight', 'border_kernel', 'base_bias']


def test_rank_check_stays_in_a_torch_fx_graph_of_the_fused_layer():
    fused = folded_layer(torch.nn.Linear(3, 2).double(), before=shift_only(3, 1.), name='fc', batch_norms=('bn',))
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(fused))
    input = torch.rand(4, 3, dtype=torch.float64)
    assert torch.equal(traced(input), fused(input))
    with pytest.raises(FoldedInputError, match=r'`fc` \(Linear\) has BatchNorm `bn` folded into it'):
        traced(torch.rand(4, 3, 3, dtype=torch.float64))
