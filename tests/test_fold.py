'''Tests for the fusion math in zennit_bnfuse.fold.'''
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from zennit_bnfuse.fold import (
    batch_norm_affine, check_batch_norm, fold_into_next, fold_into_previous, output_channels_first,
    output_channels_last, relu_fold,
)


def batch_norm_2d(affine=True):
    '''BatchNorm2d with 2 channels and hand-picked statistics: scale (2, 0.5), shift (1, -1).'''
    batch_norm = torch.nn.BatchNorm2d(2, eps=0., affine=affine).double().eval()
    batch_norm.running_mean.copy_(torch.tensor([1., -2.]))
    batch_norm.running_var.copy_(torch.tensor([0.25, 4.]))
    if affine:
        batch_norm.weight.data.copy_(torch.tensor([1., 1.]))
        batch_norm.bias.data.copy_(torch.tensor([3., 0.]))
    return batch_norm


def test_affine_hand_computed():
    scale, shift = batch_norm_affine(batch_norm_2d())
    assert torch.equal(scale, torch.tensor([2., .5], dtype=torch.float64))
    assert torch.equal(shift, torch.tensor([1., 1.], dtype=torch.float64))


def test_affine_without_affine_parameters():
    scale, shift = batch_norm_affine(batch_norm_2d(affine=False))
    assert torch.equal(scale, torch.tensor([2., .5], dtype=torch.float64))
    assert torch.equal(shift, torch.tensor([-2., 1.], dtype=torch.float64))


@pytest.mark.parametrize('batch_norm', [
    torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(3), torch.nn.BatchNorm3d(3), FrozenBatchNorm2d(3),
    torch.nn.BatchNorm2d(3, affine=False),
])
def test_affine_matches_module(batch_norm):
    generator = torch.Generator().manual_seed(1)
    batch_norm = batch_norm.double().eval()
    with torch.no_grad():
        batch_norm.running_mean.copy_(torch.randn(3, generator=generator))
        batch_norm.running_var.copy_(torch.rand(3, generator=generator) + .5)
        if batch_norm.weight is not None:
            batch_norm.weight.copy_(torch.randn(3, generator=generator))
            batch_norm.bias.copy_(torch.randn(3, generator=generator))
    dims = {torch.nn.BatchNorm1d: 1}.get(type(batch_norm), 2 if not isinstance(batch_norm, torch.nn.BatchNorm3d) else 3)
    input = torch.randn(2, 3, *(4,) * dims, generator=generator, dtype=torch.float64)
    scale, shift = batch_norm_affine(batch_norm)
    shape = (1, 3) + (1,) * dims
    torch.testing.assert_close(batch_norm(input), input * scale.reshape(shape) + shift.reshape(shape))


def test_check_rejects_training_mode():
    batch_norm = torch.nn.BatchNorm2d(2).train()
    with pytest.raises(ValueError, match=r"'features\.3'.*model\.eval\(\)"):
        check_batch_norm('features.3', batch_norm)


@pytest.mark.parametrize('key', ['running_mean', 'running_var', 'weight'])
def test_check_rejects_non_finite(key):
    batch_norm = torch.nn.BatchNorm2d(2).eval()
    getattr(batch_norm, key).data[1] = float('nan')
    with pytest.raises(ValueError, match=rf"'block\.bn'.*'{key}'"):
        check_batch_norm('block.bn', batch_norm)


def test_check_accepts_frozen_and_eval():
    check_batch_norm('a', FrozenBatchNorm2d(2))
    check_batch_norm('b', torch.nn.BatchNorm2d(2).eval())
    check_batch_norm('c', torch.nn.BatchNorm2d(2, track_running_stats=False).eval())


def test_transposed_layout_round_trip_with_groups():
    # ConvTranspose2d(in=4, out=6, groups=2): weight (4, 3, k, k); output channel o reads group o // 3
    weight = torch.arange(4 * 3 * 2 * 2, dtype=torch.float64).reshape(4, 3, 2, 2)
    first = output_channels_first(weight, transposed=True, groups=2)
    assert first.shape == (6, 2, 2, 2)
    # output channel 4 is group 1, its 2nd output of the group: input channels 2, 3, column 1
    assert torch.equal(first[4], weight[2:4, 1])
    assert torch.equal(output_channels_last(first, transposed=True, groups=2), weight)


def test_fold_into_previous_transposed_grouped_matches_module():
    generator = torch.Generator().manual_seed(2)
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2).double().eval()
    batch_norm = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        batch_norm.running_mean.copy_(torch.randn(6, generator=generator))
        batch_norm.weight.copy_(torch.randn(6, generator=generator))
    weight, bias = fold_into_previous(conv.weight.detach(), conv.bias.detach(), batch_norm, transposed=True, groups=2)
    input = torch.randn(1, 4, 5, 5, generator=generator, dtype=torch.float64)
    expected = batch_norm(conv(input))
    actual = torch.nn.functional.conv_transpose2d(input, weight, bias, stride=2, groups=2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_fold_into_next_hand_computed():
    # Linear 2 -> 1 with W = [[1, 2]], b = [3]; input map scale (2, 0.5), shift (1, 1)
    weight = torch.tensor([[1., 2.]], dtype=torch.float64)
    bias = torch.tensor([3.], dtype=torch.float64)
    scale = torch.tensor([2., .5], dtype=torch.float64)
    shift = torch.tensor([1., 1.], dtype=torch.float64)
    fused_weight, constant_bias, border_kernel = fold_into_next(weight, bias, scale, shift)
    assert torch.equal(fused_weight, torch.tensor([[2., 1.]], dtype=torch.float64))
    assert torch.equal(constant_bias, torch.tensor([6.], dtype=torch.float64))
    assert torch.equal(border_kernel, torch.tensor([[3.]], dtype=torch.float64))


def test_fold_into_next_grouped_conv_reads_right_channels():
    # depthwise conv with 2 channels, 1x1 kernel: each output reads only its own input channel
    weight = torch.tensor([[[[2.]]], [[[3.]]]], dtype=torch.float64)
    scale = torch.tensor([10., 100.], dtype=torch.float64)
    shift = torch.tensor([1., -1.], dtype=torch.float64)
    fused_weight, constant_bias, _ = fold_into_next(weight, None, scale, shift, groups=2)
    assert torch.equal(fused_weight.flatten(), torch.tensor([20., 300.], dtype=torch.float64))
    assert torch.equal(constant_bias, torch.tensor([2., -3.], dtype=torch.float64))


def test_relu_fold_exact_including_negative_and_zero_scale():
    scale = torch.tensor([2., -0.5, 0., 0.], dtype=torch.float64)
    shift = torch.tensor([1., 1., 3., -3.], dtype=torch.float64)
    sign, threshold, next_scale = relu_fold(scale, shift)
    assert torch.equal(sign, torch.tensor([1., -1., 0., 0.], dtype=torch.float64))
    assert torch.equal(next_scale, torch.tensor([2., .5, 1., 1.], dtype=torch.float64))
    input = torch.linspace(-4, 4, 17, dtype=torch.float64)[:, None].expand(17, 4)
    expected = torch.relu(input * scale + shift)
    actual = next_scale * torch.relu(input * sign + threshold)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize('variance, eps', [(-1., 0.5), (0., 0.), (-1e-5, 1e-5)])
def test_check_rejects_non_positive_variance_plus_eps(variance, eps):
    batch_norm = torch.nn.BatchNorm2d(3, eps=eps).eval()
    batch_norm.running_var[2] = variance
    with pytest.raises(ValueError, match=r"'block\.bn' has running_var \+ eps <= 0 in channel\(s\) \[2\].*reload"):
        check_batch_norm('block.bn', batch_norm)


def test_check_rejects_non_positive_variance_in_frozen_batch_norm():
    batch_norm = FrozenBatchNorm2d(2, eps=0.)
    batch_norm.running_var[0] = 0.
    with pytest.raises(ValueError, match=r"'f' has running_var \+ eps <= 0 in channel\(s\) \[0\]"):
        check_batch_norm('f', batch_norm)
