'''Tests for the modules and functions the LRP graph rewrite puts in place of functional ops
(zennit_bnfuse.graph_layers).'''
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d
from zennit.composites import EpsilonPlusFlat
from zennit.layer import Sum

from conftest import randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.graph_layers import MeanReduction, SumReduction, scale_passing_relevance, split_norm_act


@pytest.mark.parametrize('dim, keepdim', [(None, False), (None, True), (1, False), ((2, 3), True), ([0, -1], False)])
def test_reductions(dim, keepdim):
    input = torch.arange(24, dtype=torch.float64).reshape(1, 2, 3, 4)
    kwargs = {} if dim is None and not keepdim else {'dim': dim, 'keepdim': keepdim}
    assert torch.equal(SumReduction(dim, keepdim)(input), input.sum(**kwargs))
    assert torch.equal(MeanReduction(dim, keepdim)(input), input.mean(**kwargs))
    # Zennit's composites give Sum the Norm rule
    assert isinstance(MeanReduction(dim, keepdim), Sum)


def test_scale_passing_relevance():
    signal = torch.tensor([[1.], [2.]], requires_grad=True)
    factor = torch.tensor([[2., 4., 8.]], requires_grad=True)
    product = scale_passing_relevance(signal, factor)
    quotient = scale_passing_relevance(signal, factor, divide=True)
    assert torch.equal(product, torch.tensor([[2., 4., 8.], [4., 8., 16.]]))
    assert torch.equal(quotient, torch.tensor([[.5, .25, .125], [1., .5, .25]]))
    relevance = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    for output in (product, quotient):
        to_signal, to_factor = torch.autograd.grad(output, (signal, factor), relevance)
        # the signal was broadcast over 3 columns: each row's relevance is summed back; the factor gets none
        assert torch.equal(to_signal, torch.tensor([[6.], [15.]]))
        assert torch.equal(to_factor, torch.zeros(1, 3))
    to_signal, = torch.autograd.grad(scale_passing_relevance(signal, .5), signal, torch.ones(2, 1))
    assert torch.equal(to_signal, torch.ones(2, 1))


timm = pytest.importorskip('timm', reason='timm norm-act layers need timm (the test extra)')
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d  # noqa: E402
from timm.layers.norm_act import convert_sync_batchnorm  # noqa: E402


def norm_acts():
    '''timm's BatchNorm + activation modules with random statistics, float64, and the plain type of their norm.'''
    torch.manual_seed(0)
    batch_norm_act = randomize_batch_norms(BatchNormAct2d(3, act_layer=torch.nn.SiLU).double())
    frozen = FrozenBatchNormAct2d(3, act_layer=torch.nn.ReLU).double()
    frozen.load_state_dict({key: value for key, value in batch_norm_act.state_dict().items()
                            if key != 'num_batches_tracked'})
    sync = convert_sync_batchnorm(torch.nn.Sequential(batch_norm_act))[0].eval()
    return [(batch_norm_act, torch.nn.BatchNorm2d), (frozen, FrozenBatchNorm2d), (sync, torch.nn.SyncBatchNorm)]


@pytest.mark.parametrize('index', range(3))
def test_split_norm_act(index):
    module, norm_type = norm_acts()[index]
    input = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    norm, parts = split_norm_act(module)
    assert type(norm) is norm_type and parts == ['act'] and norm.act is module.act
    assert all(getattr(norm, name) is tensor
               for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)))
    torch.testing.assert_close(norm.act(norm(input)), module(input), rtol=0, atol=1e-15)


class NormActNet(torch.nn.Module):
    '''conv -> BatchNorm + SiLU -> global mean -> linear, with the norm-act layer as one timm module or as two.'''
    def __init__(self, split):
        super().__init__()
        self.split = split
        self.conv = torch.nn.Conv2d(2, 3, 3)
        if split:
            self.bn = torch.nn.BatchNorm2d(3)
            self.bn.act = torch.nn.SiLU()
        else:
            self.bn = BatchNormAct2d(3, act_layer=torch.nn.SiLU)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.split:
            x = self.bn.act(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize('handling', ['unfused', 'naive'])
@pytest.mark.parametrize('engine', ['fused', 'composite'])
def test_norm_act_gets_the_rules_of_its_parts(handling, engine):
    # the BatchNorm part gets the handling's rule, the SiLU the activation rule (pass), as for the two modules;
    # epsilon on the norm-act module as a whole would treat BatchNorm + SiLU as one affine layer
    torch.manual_seed(0)
    model = randomize_batch_norms(NormActNet(split=False).double())
    reference = NormActNet(split=True).double().eval()
    reference.load_state_dict(model.state_dict())
    input = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(input), reference(input), rtol=0, atol=1e-15)

    def explain(network):
        lrp = FusedLRP(network, handling=handling) if engine == 'fused' else CompositeLRP(
            network, EpsilonPlusFlat(), handling=handling)
        return lrp.attribute(input, target=1)
    torch.testing.assert_close(explain(model), explain(reference), rtol=1e-12, atol=1e-15)
