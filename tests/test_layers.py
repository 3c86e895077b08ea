'''Tests for the fused modules in zennit_bnfuse.layers.'''
import pytest
import torch

from zennit_bnfuse.layers import BiasMapConv2d, ThresholdReLU, detached_copy, folded_layer, needs_bias_map


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
    assert type(fused) is torch.nn.Conv2d
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
    assert isinstance(activation, torch.nn.ReLU)


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
