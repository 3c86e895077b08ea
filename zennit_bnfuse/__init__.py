'''zennit_bnfuse: exact BatchNorm fusion for Layer-wise Relevance Propagation in Zennit and Captum.'''
from .attribution import CompositeLRP, FusedLRP
from .canonizers import FuseBatchNorm
from .fusion import fuse
from .handling import ALL_HANDLINGS, HANDLINGS, BatchNormHandling, bn_handling
from .layers import FoldedInputError, FoldedTrainingError, ThresholdReLU
from .memory import keep_freed_memory
from .pairs import find_fusable_pairs
from .quantus_interop import explain_func
from .report import FusedBatchNorm, FusionReport, UnfusedBatchNorm
from .singlepass import SinglePass

__all__ = [
    'ALL_HANDLINGS',
    'BatchNormHandling',
    'CompositeLRP',
    'FuseBatchNorm',
    'FusedBatchNorm',
    'FoldedInputError',
    'FoldedTrainingError',
    'FusedLRP',
    'FusionReport',
    'HANDLINGS',
    'SinglePass',
    'ThresholdReLU',
    'UnfusedBatchNorm',
    'bn_handling',
    'explain_func',
    'find_fusable_pairs',
    'fuse',
    'keep_freed_memory',
]
