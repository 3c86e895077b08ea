'''zennit_bnfuse: exact BatchNorm fusion for Layer-wise Relevance Propagation in Zennit and Captum.'''
from .canonizers import FuseBatchNorm
from .fusion import fuse
from .layers import ThresholdReLU
from .pairs import find_fusable_pairs
from .report import FusedBatchNorm, FusionReport, UnfusedBatchNorm

__all__ = [
    'FuseBatchNorm',
    'FusedBatchNorm',
    'FusionReport',
    'ThresholdReLU',
    'UnfusedBatchNorm',
    'find_fusable_pairs',
    'fuse',
]
