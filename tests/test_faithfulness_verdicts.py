'''Tests for how benchmarks/faithfulness.py turns paired differences into verdicts on the paper's claims.'''
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / 'benchmarks'))
from faithfulness import claims, classify  # noqa: E402

INFORMATIVE = {'abpc': (1.0, 0.1)}
UNIFORM = {'abpc': (0., 0.)}


@pytest.mark.parametrize('aopc, abpc, verdict', [
    ((0.5, 0.1), (0.0, 0.1), 'better'),        # AOPC beyond its interval, ABPC inside
    ((-0.5, 0.1), (-0.3, 0.1), 'worse'),
    ((0.5, 0.1), (-0.3, 0.1), 'mixed'),        # the two metrics disagree
    ((0.05, 0.1), (-0.05, 0.1), 'no difference'),
    ((0., 0.), (0., 0.), 'identical'),
])
def test_classify(aopc, abpc, verdict):
    rows = {'c/fused': INFORMATIVE, 'c/unfused': INFORMATIVE}
    assert classify({'aopc_morf': aopc, 'abpc': abpc}, rows, 'c/fused', 'c/unfused') == verdict


def test_classify_uniform_heatmaps_are_not_a_verdict():
    rows = {'c/fused': UNIFORM, 'c/naive': UNIFORM}
    assert classify({'aopc_morf': (0., 0.), 'abpc': (0., 0.)}, rows, 'c/fused', 'c/naive') == 'uniform'


def model_summary(unfused, naive):
    '''A summary of one model with one composite: ``unfused`` and ``naive`` are (AOPC, ABPC) mean differences.'''
    differences = {f'epsilon: fused - {other}': {'aopc_morf': (aopc, 0.1), 'abpc': (abpc, 0.1)}
                   for other, (aopc, abpc) in (('unfused', unfused), ('naive', naive))}
    methods = {f'epsilon/{handling}': INFORMATIVE for handling in ('fused', 'unfused', 'naive')}
    return {'methods': methods, 'differences': differences}


def test_claims_follow_the_numbers():
    # conv models: fused beats unfused, loses to naive; FC+BN models: fused loses to both
    summary = {'mnist-cnn-bn': model_summary(unfused=(0.5, 0.5), naive=(-0.5, -0.5)),
               'mnist-mlp-bn': model_summary(unfused=(-0.5, -0.5), naive=(-0.5, 0.5))}
    text = '\n'.join(claims(summary))
    assert ('against unfused they support it (fused better in 1, worse or mixed in 0 of 1 comparisons); '
            'against naive they do not support it (fused better in 0, worse or mixed in 1 of 1 comparisons)') in text
    assert ('fused is better in 0 and worse or mixed in 2 of 2 informative comparisons, against 1 of 2 on the '
            'convolutional models: the numbers support it') in text
    assert '- mnist-mlp-bn, Epsilon, fused - naive: AOPC -0.500 ± 0.100; ABPC +0.500 ± 0.100 (mixed)' in text


def test_claim_two_not_supported_when_fc_models_do_better():
    summary = {'mnist-cnn-bn': model_summary(unfused=(0.5, 0.5), naive=(-0.5, -0.5)),
               'mnist-mlp-bn': model_summary(unfused=(0.5, 0.5), naive=(0.5, 0.5))}
    assert 'the numbers do not support it' in '\n'.join(claims(summary))
