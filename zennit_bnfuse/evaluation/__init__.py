'''The evaluation kit: the study's models and data, faithfulness metrics, figures and explanation helpers.

The library core (:py:mod:`zennit_bnfuse`: fold, pairs, fusion, layers, canonizers, singlepass, attribution, handling,
report) does not import from here; the command line and the benchmarks do.
'''
