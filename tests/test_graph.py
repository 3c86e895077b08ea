'''Tests for the LRP-ready graph rewrite (zennit_bnfuse.graph).'''
import copy

import pytest
import torch
from captum.attr._utils.custom_modules import Addition_Module
from zennit.composites import EpsilonPlusFlat
from zennit.layer import Sum

from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.graph import lrp_graph


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
    prepared, copies = lrp_graph(copy.deepcopy(model), residual=residual)
    torch.testing.assert_close(prepared(input), expected, rtol=0, atol=1e-12)
    adds = [name for name, module in prepared.named_modules() if isinstance(module, add_type)]
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
    with pytest.raises(ValueError, match="residual must be 'captum' or 'zennit'"):
        lrp_graph(torch.nn.Linear(1, 1), residual='sum')
