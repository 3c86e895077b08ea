'''The package's warnings point at the user's call, through fuse(), Captum's usage-logging wrapper and the engines.'''
import warnings

import pytest
import torch
from zennit.composites import EpsilonPlusFlat

from conftest import randomize_batch_norms
from fusion_cases import untraceable_cases
from zennit_bnfuse import CompositeLRP, FusedLRP, fuse
from zennit_bnfuse.user_warnings import warn_user


class Scaled(torch.nn.Module):
    '''conv -> BatchNorm -> relu -> mean -> a product with a tensor argument (a functional op) -> linear.'''
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Linear(3, 2)

    def forward(self, x, scale):
        return self.linear(torch.relu(self.bn(self.conv(x))).mean((2, 3)) * scale)


def caught_warnings(call):
    '''The zennit_bnfuse warnings ``call()`` gives.'''
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        call()
    return [warning for warning in caught if str(warning.message).startswith('zennit_bnfuse')]


def test_warn_user_points_at_its_caller_outside_the_package():
    with pytest.warns(UserWarning, match='message') as caught:
        warn_user('message')
    assert caught[0].filename == __file__


def test_fuse_warns_at_the_users_call():
    '''The warning that the forward could not be traced pointed at fusion.py (find_fusable_pairs' caller).'''
    model, _, _ = untraceable_cases()['sequential-folds-right']
    caught = caught_warnings(lambda: fuse(model))
    assert [warning.filename for warning in caught] == [__file__] and 'could not trace' in str(caught[0].message)


@pytest.mark.parametrize('explainer', [FusedLRP, lambda model: CompositeLRP(model, EpsilonPlusFlat())],
                         ids=['fused', 'composite'])
def test_explainers_warn_at_the_users_call(explainer):
    '''The warning about a functional op passed by its gradient pointed at handling.py.'''
    model = randomize_batch_norms(Scaled()).double().eval()
    input = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    scale = torch.tensor(2., dtype=torch.float64)
    caught = caught_warnings(lambda: explainer(model).attribute(input, target=0, additional_forward_args=(scale,)))
    assert [warning.filename for warning in caught] == [__file__] and 'functional op(s)' in str(caught[0].message)


def test_the_canonizer_and_captums_wrappers_warn_at_the_users_call():
    '''Warnings raised while Zennit registers the canonizer, or under Captum's NoiseTunnel, pointed into zennit's and
    captum's sources.'''
    from captum.attr import NoiseTunnel
    from zennit_bnfuse import FuseBatchNorm
    model, input, _ = untraceable_cases()['sequential-folds-right']

    def in_context():
        with EpsilonPlusFlat(canonizers=[FuseBatchNorm()]).context(model):
            pass
    caught = caught_warnings(in_context)
    assert caught and {warning.filename for warning in caught} == {__file__}
    scaled = randomize_batch_norms(Scaled()).double().eval()
    scale = torch.tensor(2., dtype=torch.float64)
    caught = caught_warnings(lambda: NoiseTunnel(FusedLRP(scaled)).attribute(
        torch.rand(2, 2, 5, 5, dtype=torch.float64), target=0, nt_samples=2, additional_forward_args=(scale,)))
    assert caught and {warning.filename for warning in caught} == {__file__}
