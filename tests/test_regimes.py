'''Tests for zennit_bnfuse.evaluation.regimes: negating BatchNorm scales keeps the function, the fused model and fused
relevance, and changes naive and unfused relevance exactly where the rules treat negative weights differently.'''
import pytest
import torch

from conftest import randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FusedLRP, fuse
from zennit_bnfuse.evaluation.composites import COMPOSITES, batch_norm_rule, make_composite
from zennit_bnfuse.evaluation.models import INPUT_SHAPES, MODELS, build, dataset_of, pretrained
from zennit_bnfuse.evaluation.regimes import flip_batch_norm_signs, relative_output_difference

BATCH_NORM_MODELS = [name for name, (_, _, batch_norm, _) in MODELS.items() if batch_norm]


def shipped(name):
    '''The shipped model, or (before its weights exist) the architecture with random BatchNorm statistics.'''
    try:
        return pretrained(name)
    except FileNotFoundError:
        return randomize_batch_norms(build(name))


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize('name', BATCH_NORM_MODELS)
def test_same_function_on_shipped_models(name, dtype, tolerance, snapshot):
    model = shipped(name).to(dtype)
    user = snapshot(model)
    flip = flip_batch_norm_signs(model, share=.5, seed=1)
    user.assert_unchanged()
    inputs = torch.rand(3, *INPUT_SHAPES[dataset_of(name)], dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(flip.model(inputs), model(inputs), rtol=tolerance, atol=tolerance)
    assert relative_output_difference(model, flip.model, inputs, batch_size=2) < tolerance
    assert flip.flipped and flip.negative_share() == pytest.approx(.5, abs=1e-9)
    modules = dict(model.named_modules())
    for bn, layer in flip.producers.items():
        changed = (dict(flip.model.named_modules())[layer].weight != modules[layer].weight).flatten(1).any(dim=1)
        assert torch.equal(changed.nonzero()[:, 0], flip.flipped[bn])


def test_skipped_batch_norms_of_the_preact_resnet():
    flip = flip_batch_norm_signs(shipped('cifar10-preact-resnet'), share=1.)
    # conv1 -> bn2 inside each block; every bn1 and the final bn follow a residual sum (or the stem, whose output
    # also feeds the first block's shortcut)
    assert sorted(flip.flipped) == [f'blocks.{index}.bn2' for index in range(9)]
    assert sorted(flip.skipped) == sorted([f'blocks.{index}.bn1' for index in range(9)] + ['bn'])
    # blocks.3.bn1 follows a residual sum and folds through its ReLU into the shortcut and conv1 after it
    assert 'no conv/linear layer produces its input for it alone' in flip.skipped['blocks.3.bn1']
    assert 'for it alone' in flip.skipped['bn']


@pytest.mark.parametrize('share', [0., .25, .5, 1.])
def test_share_of_negative_scales(share):
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).double())
    flip = flip_batch_norm_signs(model, share=share, seed=0)
    counts = [(flip.model[index].weight < 0).sum().item() for index in (1, 5)]
    assert counts == [round(share * 8), round(share * 6)]
    assert [len(flip.flipped[name]) for name in ('1', '5')] == counts
    # the seed picks the channels
    if 0 < share < 1:
        assert not torch.equal(flip.flipped['1'], flip_batch_norm_signs(model, share=share, seed=5).flipped['1'])


def test_transposed_grouped_producers_and_skips():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
            self.bn_up = torch.nn.BatchNorm2d(6)
            self.grouped = torch.nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)
            self.bn_grouped = torch.nn.BatchNorm2d(6)
            self.relu = torch.nn.ReLU()
            self.bn_relu = torch.nn.BatchNorm2d(6)
            self.conv = torch.nn.Conv2d(6, 6, 1)
            self.bn_shared = torch.nn.BatchNorm2d(6)
            self.conv_plain = torch.nn.Conv2d(6, 6, 1)
            self.plain = torch.nn.BatchNorm2d(6, affine=False)

        def forward(self, input):
            hidden = self.bn_grouped(self.grouped(self.bn_up(self.up(input))))
            hidden = self.bn_relu(self.relu(hidden))
            shared = self.conv(hidden)
            return self.bn_shared(shared) + shared + self.plain(self.conv_plain(hidden))

    torch.manual_seed(0)
    model = randomize_batch_norms(Net().double())
    flip = flip_batch_norm_signs(model, share=.5)
    inputs = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(flip.model(inputs), model(inputs), rtol=1e-12, atol=1e-12)
    assert sorted(flip.flipped) == ['bn_grouped', 'bn_up']
    assert set(flip.skipped) == {'bn_relu', 'bn_shared', 'plain'}
    assert 'also feeds' in flip.skipped['bn_shared']
    assert flip.skipped['plain'] == 'it has no affine weight to negate'


def test_fused_model_is_the_same():
    model = shipped('mnist-cnn-bn').double()
    flip = flip_batch_norm_signs(model, share=.5)
    fused, _ = fuse(model)
    fused_flip, _ = fuse(flip.model)
    for (name, value), (_, flipped) in zip(fused.state_dict().items(), fused_flip.state_dict().items()):
        torch.testing.assert_close(flipped, value, rtol=1e-14, atol=1e-15, msg=name)


def small_net():
    torch.manual_seed(0)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        torch.nn.Linear(8, 3)).double())


def relevance(model, composite, handling):
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lrp = CompositeLRP(model, make_composite(composite), handling=handling,
                       batch_norm_rule=batch_norm_rule(composite, handling))
    return lrp.attribute(images, target=[0, 1, 2])


# rules that treat positive and negative weights differently change under naive and unfused; LRP-epsilon does not
CHANGES = {'epsilon-plus-flat', 'epsilon-alpha2-beta1-flat', 'epsilon-gamma-box'}


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
def test_relevance_under_negative_scales(composite):
    model = small_net()
    flipped = flip_batch_norm_signs(model, share=.5).model
    torch.testing.assert_close(relevance(flipped, composite, 'fused'), relevance(model, composite, 'fused'),
                               rtol=1e-9, atol=1e-12)
    for handling in ('naive', 'unfused'):
        before, after = relevance(model, composite, handling), relevance(flipped, composite, handling)
        if composite.replace('-nobias', '') in CHANGES:
            assert not torch.allclose(after, before, rtol=1e-3, atol=1e-6), handling
        else:
            torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12, msg=handling)


def test_captum_relevance_under_negative_scales():
    # Captum's EpsilonRule everywhere: the same relevance before and after, under every handling
    model = small_net()
    flipped = flip_batch_norm_signs(model, share=.5).model
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for handling in ('fused', 'unfused', 'naive'):
        before = FusedLRP(model, handling=handling).attribute(images, target=[0, 1, 2])
        after = FusedLRP(flipped, handling=handling).attribute(images, target=[0, 1, 2])
        torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12, msg=handling)


def test_relative_output_difference():
    model = small_net()
    other = flip_batch_norm_signs(model, share=.5).model
    inputs = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        other[-1].bias[0] += 1e-3
        logits = model(inputs)
    expected = (1e-3 / logits.abs().amax(dim=1)).max().item()
    assert relative_output_difference(model, other, inputs) == pytest.approx(expected, rel=1e-6)


def test_share_error():
    with pytest.raises(ValueError, match=r'share must lie in \[0, 1\], not 1.5'):
        flip_batch_norm_signs(small_net(), share=1.5)
