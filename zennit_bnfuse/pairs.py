'''Finding fusable (BatchNorm, layer) pairs in a model's forward graph.

The forward is traced with :py:mod:`torch.fx`, so functional ops in ``forward`` (``torch.cat``, ``+``, ``F.relu``) are
seen. Where tracing fails, each ``nn.Sequential`` container is traced on its own with its children as leaves, so
only modules that are neighbours inside a Sequential are paired, and only folded where example inputs confirm them.
'''
import copy
import operator
import warnings
from collections import Counter
from collections.abc import Hashable
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d

from .fold import FOLDABLE_BATCH_NORM_TYPES, batch_norm_affine, check_batch_norm, has_running_stats, is_batch_norm, \
    relu_fold, timm_layers
from .aliasing import written_after
from .checks import check_model
from .layers import ThresholdReLU, is_layer_like, layer_kind_problem
from .replacements import model_copy
from .report import FusedBatchNorm, FusionReport, UnfusedBatchNorm
from .specialization import concrete_arguments, trace_for_call
from .user_warnings import warn_user
from .verification import as_input_tuple, check_folds, refuse_unproven


TRANSPOSED_TYPES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)

# pooling modules and functions; an affine per-channel map moves through averages of real inputs, a non-negative
# scale through every one of them (see GraphPairs.affine_step and GraphPairs.commuting_step)
AVERAGE_POOL_MODULES = (torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d)
ADAPTIVE_AVERAGE_POOL_MODULES = (torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d)
MAX_POOL_MODULES = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool1d,
                    torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)
AVERAGE_POOL_FUNCTIONS = {
    torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d}
ADAPTIVE_AVERAGE_POOL_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
                                   torch.nn.functional.adaptive_avg_pool3d}
ADAPTIVE_MAX_POOL_FUNCTIONS = {torch.nn.functional.adaptive_max_pool1d, torch.nn.functional.adaptive_max_pool2d,
                               torch.nn.functional.adaptive_max_pool3d}
MAX_POOL_FUNCTIONS = {torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
                      torch.nn.functional.max_pool3d} | ADAPTIVE_MAX_POOL_FUNCTIONS
# how many trailing dims each pooling pools
POOLING_DIMS = {pool: int(pool.__name__[-2]) for pool in (
    *AVERAGE_POOL_MODULES, *ADAPTIVE_AVERAGE_POOL_MODULES, *MAX_POOL_MODULES,
    *AVERAGE_POOL_FUNCTIONS, *ADAPTIVE_AVERAGE_POOL_FUNCTIONS, *MAX_POOL_FUNCTIONS)}
# ops between "BN -> ReLU" and the next layer through which a non-negative per-channel scale moves unchanged
SCALE_COMMUTING_MODULES = (
    torch.nn.ReLU, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
    *MAX_POOL_MODULES, *AVERAGE_POOL_MODULES, *ADAPTIVE_AVERAGE_POOL_MODULES,
)
SCALE_COMMUTING_FUNCTIONS = {torch.relu, torch.nn.functional.relu} | MAX_POOL_FUNCTIONS | AVERAGE_POOL_FUNCTIONS | (
    ADAPTIVE_AVERAGE_POOL_FUNCTIONS)
RELU_METHODS = {'relu', 'relu_'}
# why a BatchNorm's output cannot reach a layer through an op
NOT_PASSED = 'not a conv/linear layer, ReLU, pooling or flatten'
RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu}
# modules that are the identity in eval mode: an affine map moves through them unchanged
EVAL_IDENTITY_MODULES = (
    torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout,
)
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
# normalisation layers other than BatchNorm (their subclasses included, such as timm's GroupNorm, LayerNorm2d and
# GroupNormAct): they normalise by statistics of their own input (InstanceNorm with running statistics by stored ones),
# so no fold crosses them, and LRP must see each as one module that gets a rule of its own (see other_norm_types)
OTHER_NORM_TYPES = tuple(norm for norm in (
    torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm,
    getattr(torch.nn, 'RMSNorm', None)) if norm is not None)


def batch_norm_spatial_dims(batch_norm):
    '''How many spatial dims the input of ``batch_norm`` has, where its type fixes that (2 for BatchNorm2d, timm's
    subclasses of it and the frozen 2d kinds, 3 for BatchNorm3d), else None (BatchNorm1d takes ``(N, C)`` and
    ``(N, C, L)``, SyncBatchNorm any rank).'''
    extension = timm_layers()
    if isinstance(batch_norm, (torch.nn.BatchNorm2d, FrozenBatchNorm2d,
                               *(() if extension is None else extension.FROZEN_2D_TYPES))):
        return 2
    if isinstance(batch_norm, torch.nn.BatchNorm3d):
        return 3
    return None


def other_norm_types():
    ''':py:data:`OTHER_NORM_TYPES`, with timm's normalisation layers that do not subclass torch's (EvoNorm,
    FilterResponseNorm, RmsNorm, SimpleNorm) once timm is imported.'''
    extension = timm_layers()
    return OTHER_NORM_TYPES if extension is None else OTHER_NORM_TYPES + extension.OTHER_NORM_TYPES


class InPlaceProxy(torch.fx.Proxy):
    '''An fx proxy that records an augmented assignment (``x += y``, ``x *= y``, ...) as the in-place operator
    (``operator.iadd``, ...). A plain proxy has no ``__iadd__``, so Python falls back to ``x = x + y`` and the graph
    shows a new tensor where the forward writes into ``x``, which every tensor sharing its memory sees. Generated code
    would rebind the variable of an immutable operand (an int from a shape): a graph that runs turns those back into
    the out-of-place operator (:py:class:`~zennit_bnfuse.graph.LRPTracer`). An item assignment (``x[i] = v`` on a
    tensor, ``features[0] = h`` on a list argument) is recorded as ``operator.setitem``, where a plain proxy makes
    the trace fail.'''
    def __setitem__(self, key, value):
        self.tracer.create_proxy('call_function', operator.setitem, (self, key, value), {})


for _name in ('iadd', 'isub', 'imul', 'itruediv', 'ifloordiv', 'imod', 'ipow', 'imatmul', 'iand', 'ior', 'ixor',
              'ilshift', 'irshift'):
    def _in_place(self, other, operation=getattr(operator, _name)):
        return self.tracer.create_proxy('call_function', operation, (self, other), {})
    setattr(InPlaceProxy, f'__{_name}__', _in_place)


class LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every BatchNorm (torchvision's FrozenBatchNorm2d and timm's norm-act layers included),
    every Linear/Conv layer and its subclasses (and layers timm builds in their place), every other normalisation layer
    (:py:func:`other_norm_types`), the modules of this package, timm's 'same'-padded pooling, the modules timm marks
    as untraceable and, if given, every child of ``leaf_parent`` as one ``call_module`` node, and the functions timm
    marks as untraceable as one ``call_function`` node; augmented assignments are recorded as in-place operators
    (:py:class:`InPlaceProxy`)."""
    def __init__(self, leaf_parent=None):
        extension = timm_layers()
        self.notrace_functions = () if extension is None else extension.notrace_functions()
        super().__init__(autowrap_functions=self.notrace_functions)
        self.leaf_parent = leaf_parent
        self.notrace_modules = () if extension is None else extension.notrace_modules()

    def proxy(self, node):
        return InPlaceProxy(node, self)

    def trace(self, root, concrete_args=None):
        '''As :py:meth:`torch.fx.Tracer.trace`; raises TypeError for a module whose ``forward`` is assigned on the
        instance, which the model runs but torch.fx would not trace (it traces the class's).'''
        if has_own_forward(root):
            raise TypeError(f'the forward of {type(root).__name__} is assigned on the instance; torch.fx traces the '
                            'forward of its class instead')
        return super().trace(root, concrete_args)

    def is_leaf_module(self, module, module_qualified_name):
        if self.leaf_parent is not None:
            return any(module is child for child in self.leaf_parent.children())
        if self.is_layer_leaf(module) or type(module) in self.notrace_modules:
            return True
        return super().is_leaf_module(module, module_qualified_name)

    def is_layer_leaf(self, module):
        '''Whether ``module`` is kept as one node because the analyses see it as one layer (a BatchNorm, a conv or
        linear layer, another normalisation, ...), whether or not timm marks it untraceable.'''
        if is_batch_norm(module) or isinstance(module, (ThresholdReLU, *other_norm_types())) or is_layer_like(module):
            return True
        extension = timm_layers()
        return extension is not None and type(module) in extension.SCALE_COMMUTING_MODULES

    def kept_whole(self, module):
        '''Whether ``module`` is kept as one node only because timm marks it untraceable: a block whose insides the
        graph does not show.'''
        return self.leaf_parent is None and type(module) in self.notrace_modules and not self.is_layer_leaf(module)


@contextmanager
def tracing_copy(model):
    """A module to trace in place of ``model``: a copy that shares its parameters.

    Tracing runs the forward's Python with fx proxies in place of tensors: what the forward writes into its modules'
    attributes (a feature kept for later, a cache keyed by device, a call counter) lands in the copy, not in the
    user's model; so does what it writes into buffers (torch.fx hands the forward the buffers themselves, and
    ``self.count += 1`` runs). The copy shares the parameters (:py:func:`~zennit_bnfuse.replacements.model_copy`
    copies the rest) and names its modules as ``model`` does, so a graph traced on it names ``model``'s modules. A
    model that cannot be deep-copied is given itself, and each module's attributes are put back when the context
    ends, with the contents of its dicts, lists and sets, and the values of its buffers (what lies deeper, and other
    tensors changed in place, are not).

    Yields
    ------
    :py:obj:`torch.nn.Module`
    """
    # the parameters are shared (fx reads them as proxies); buffers and other tensors are copied, as a forward may
    # change them in place (``self.count += 1``)
    shared = {id(tensor): tensor for tensor in model.parameters()}
    try:
        traced = model_copy(model, shared)
    except TypeError:  # objects deepcopy does not handle (locks, open files, ...)
        traced = None
    if traced is not None:
        yield traced
        return
    attributes = [(module, dict(vars(module)), dict(container_contents(vars(module)))) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
        for module, before, contents in attributes:
            vars(module).clear()
            vars(module).update(before)
            for key, content in contents.items():  # a cache filled in forward: its contents as they were
                container = before[key]
                container.clear()
                if isinstance(container, list):
                    container.extend(content)
                else:
                    container.update(content)


def container_contents(attributes):
    '''``(name, shallow copy)`` for each dict, list and set (subclasses included) among ``attributes``, that
    ``copy.copy`` can copy.'''
    for key, value in attributes.items():
        if isinstance(value, (dict, list, set)):
            try:
                yield key, copy.copy(value)
            except Exception:  # a subclass whose copy needs more than its contents
                continue


class HookedCall(NamedTuple):
    '''A call of a module with hooks in a traced forward: what its hooks see.'''
    name: str
    inputs: list  # the nodes it is called with
    outputs: list  # the nodes it returns (its own node, or nodes of its traced forward; its input for an identity)
    sees_output: bool  # False where its hooks are forward pre-hooks only


def proxy_nodes(value):
    '''The fx nodes of the proxies in ``value`` (nested tuples, lists and dicts included).'''
    nodes = []
    torch.fx.node.map_aggregate(value, lambda item: nodes.append(item.node) if isinstance(item, torch.fx.Proxy)
                                else None)
    return nodes


class PairTracer(LeafTracer):
    """:py:class:`LeafTracer` for finding pairs: a timm norm-act layer is recorded as its BatchNorm part (a call of
    the layer itself) followed by calls of its ``drop`` and ``act`` modules, which is what its eval-mode forward
    computes (see :py:mod:`zennit_bnfuse.timm_layers`); the modules and functions timm marks as untraceable are kept
    whole, and augmented assignments are recorded as the in-place operators they are (:py:class:`InPlaceProxy`).
    The graph is for analysis only: running it would apply ``drop`` and ``act`` twice."""
    def __init__(self, leaf_parent=None):
        super().__init__(leaf_parent)
        self.hooked_calls = []  # a HookedCall per call of a module with hooks, leaf or traced through

    def trace(self, root, concrete_args=None):
        self.hooked_calls = []  # those of this trace only (a forward may be traced again, see trace_for_call)
        return super().trace(root, concrete_args)

    def call_module(self, module, forward, args, kwargs):
        output = super().call_module(module, forward, args, kwargs)
        if type(module) not in FOLDABLE_BATCH_NORM_TYPES and batch_norm_kind_problem(module) is None:
            for _, child in timm_layers().norm_act_tail(module):
                output = self.call_module(child, child.forward, (output,), {})
        if has_hooks(module):
            self.hooked_calls.append(HookedCall(
                self.path_of_module(module), proxy_nodes((args, kwargs)), proxy_nodes(output),
                any(getattr(module, key) for key in ('_forward_hooks', '_backward_hooks', '_backward_pre_hooks'))))
        return output


def cat_operands(node):
    '''The tensors and the dim of the concatenation ``node`` (``torch.cat``, ``torch.concat`` or
    ``torch.concatenate``), whether given by position or by keyword (``tensors=``, ``dim=`` or ``axis=``).'''
    arguments = dict(zip(('tensors', 'dim'), node.args), **node.kwargs)
    return arguments.get('tensors'), arguments.get('dim', arguments.get('axis', 0))


def input_rank(batch_norm):
    '''The number of dims of ``batch_norm``'s input where its type fixes it (4 for 2d, 5 for 3d BatchNorms), or
    None (BatchNorm1d takes 2 or 3).'''
    if isinstance(batch_norm, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
        return 4
    return 5 if isinstance(batch_norm, torch.nn.BatchNorm3d) else None


def scale_commuting_modules():
    '''The module types a non-negative per-channel scale moves through (timm's 'same'-padded pooling included where
    timm is imported).'''
    extension = timm_layers()
    return SCALE_COMMUTING_MODULES + (() if extension is None else extension.SCALE_COMMUTING_MODULES)


def batch_norm_kind_problem(batch_norm):
    """Why ``batch_norm`` is not a kind of BatchNorm this package folds, or None.

    Folded are the exact BatchNorm types (subclasses may do more than normalise) and timm's norm-act layers whose
    eval-mode forward is the BatchNorm, then their ``drop`` and ``act`` modules.
    """
    if type(batch_norm) in FOLDABLE_BATCH_NORM_TYPES:
        return None
    extension = timm_layers()
    if extension is not None and extension.norm_act_tail(batch_norm) is not None:
        problem = extension.norm_act_problem(batch_norm)
        return None if problem is None else f'it is a {type(batch_norm).__name__} and {problem}'
    return (f'it is a {type(batch_norm).__name__}, a BatchNorm subclass whose forward may do more than normalise (e.g. '
            'apply an activation)')


def find_fusable_pairs(model, example_inputs=None, concrete_args=None):
    '''Find every BatchNorm of ``model`` that can be folded exactly, and say why the others cannot.

    Where the forward cannot be traced, the BatchNorms next to a conv/linear layer inside an ``nn.Sequential`` are
    folded only if ``example_inputs`` are given and the model with each fold gives the model's output on them (see
    :py:mod:`zennit_bnfuse.verification`); without them, none is folded.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model in eval mode. It is not changed.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Positional arguments of the model's forward. Where given, the folds are checked on them: each folded layer
        must get an input of the rank its fold assumes, and the outputs must agree (see
        :py:func:`~zennit_bnfuse.verification.check_folds`).
    concrete_args: dict[str, object], optional
        Arguments of the forward to trace as fixed values (torch.fx's ``concrete_args``): the folds are decided on
        the path the forward takes for them (``mask=None`` for a forward with ``if mask is not None``). By default
        every argument is traced as a tensor, and where the forward has arguments that are not tensors by default
        (or in ``example_inputs``), also with those values: a fold is kept only where both paths decide it alike.

    Returns
    -------
    :py:class:`zennit_bnfuse.report.FusionReport`
        The folds to do (``report.fused``), the BatchNorms to leave (``report.unfused``) and timm's
        weight-standardised convolutions that become plain ones (``report.standardized``).

    Raises
    ------
    TypeError
        If ``model`` is not a torch.nn.Module or holds a TorchScript module, or ``example_inputs`` is not a tensor or
        tuple.
    ValueError
        If a BatchNorm is in training mode or has invalid statistics, or the model raises on ``example_inputs``.
    '''
    check_model(model, 'find_fusable_pairs()')
    modules = dict(model.named_modules())
    batch_norms = {name: module for name, module in modules.items() if is_batch_norm(module)}
    for name, module in batch_norms.items():
        check_batch_norm(name, module)
    report = FusionReport()
    extension = timm_layers()
    standardized = {name for name, module in modules.items()
                    if extension is not None and type(module) in extension.STANDARDIZED_CONV_TYPES}
    if not batch_norms and not standardized:
        return report
    if '' in batch_norms:
        # the model is one BatchNorm (its forward does not trace: it branches on its mode)
        report.unfused = [UnfusedBatchNorm(name, 'the model is this BatchNorm alone: no layer to fold it into')
                          for name in batch_norms]
        return report

    with tracing_copy(model) as traced:
        try:
            tracer = PairTracer()
            graphs = [('', trace_for_call(tracer, traced, concrete_args), tracer.hooked_calls)]
        except Exception as error:  # fx raises many kinds of errors for untraceable code
            report.traced = False
            report.trace_error = f'{type(error).__name__}: {error}'.splitlines()[0]
            graphs = []
            for name, module in traced.named_modules():
                # a Sequential that runs its children in order (a subclass may run them otherwise, or not trace)
                if type(module).forward is torch.nn.Sequential.forward and not has_own_forward(module):
                    tracer = PairTracer(leaf_parent=module)
                    graphs.append((name, tracer.trace(module), tracer.hooked_calls))

    every_name = dict(model.named_modules(remove_duplicate=False))
    aliases = Counter(id(module) for module in every_name.values())
    decided = {}
    called, read_directly = set(), set()
    for prefix, graph, hooked_calls in graphs:
        # a Sequential's graph names its children under its own name, which may not be their first
        analysis = _GraphAnalysis(graph, prefix, every_name, aliases, hooked_calls)
        analysis.decide(decided)
        called.update(analysis.calls)
        read_directly.update(analysis.read_directly)
    folded = {layer for entry in decided.values() if isinstance(entry, FusedBatchNorm) for layer in entry.layers}
    if report.traced:
        # the forward computes with the standardised weight only: the module is called, its weight not read directly
        report.standardized = sorted(
            name for name in standardized - folded - read_directly if name in called and not has_hooks(modules[name]))

    where = 'in the traced (eval-mode) forward' if report.traced else 'inside an nn.Sequential'
    for name in batch_norms:
        if name in decided:
            continue
        parents = [parent for parent in called if name.startswith(f'{parent}.')]
        parent = max(parents, key=len) if parents else None
        if parent is not None and is_batch_norm(modules[parent]):
            decided[name] = UnfusedBatchNorm(
                name, f'it belongs to the BatchNorm `{parent}` ({type(modules[parent]).__name__}), whose eval-mode '
                'forward does not call it (timm\'s SplitBatchNorm2d uses its auxiliary BatchNorms only in training)')
        elif parent is not None:
            why = ('torch.nn.utils.parametrize made it parametrized, and torch.fx keeps such modules whole; FusedLRP '
                   'and CompositeLRP make it plain first' if parametrize.is_parametrized(modules[parent]) else
                   'timm marks it untraceable, or it is a layer of its own')
            decided[name] = UnfusedBatchNorm(
                name, f'it runs inside `{parent}` ({type(modules[parent]).__name__}), which the trace keeps whole '
                f'({why}), so its neighbours are not known')
        else:
            decided[name] = UnfusedBatchNorm(
                name, f'it is never called as a module {where} (e.g. a branch used only in training), so there is '
                'no layer to pair it with')
    for entry in decided.values():
        if isinstance(entry, FusedBatchNorm):
            report.fused.append(entry)
        elif report.traced:
            report.unfused.append(entry)
        else:
            report.unfused.append(UnfusedBatchNorm(
                entry.bn, f'the forward could not be traced ({report.trace_error}); {entry.reason}'))
    if report.traced and concrete_args is None:
        arguments = () if example_inputs is None else as_input_tuple(example_inputs)
        defaults = concrete_arguments(model, 0 if arguments else 1, arguments)
        if defaults:
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='zennit_bnfuse: could not trace')
                other = find_fusable_pairs(model, concrete_args=defaults)
            # where the forward with its defaults does not trace, example_inputs (which take them) prove folds
            if other.traced or example_inputs is None:
                keep_common_folds(report, other, defaults)
    if example_inputs is not None:
        check_folds(model, report, example_inputs)
    elif not report.traced:
        refuse_unproven(report)
    report.unfused = [UnfusedBatchNorm(entry.bn, entry.reason + reparameterization_hint(entry.bn, modules))
                      for entry in report.unfused]
    if not report.traced:
        done = (f'folded {len(report.fused)} of its {report.num_batch_norms} BatchNorms, those next to a conv/linear '
                'layer inside an nn.Sequential whose fold gave the model\'s output on example_inputs'
                if example_inputs is not None else
                f'folded none of its {report.num_batch_norms} BatchNorms; pass example_inputs to fold those next to '
                'a conv/linear layer inside an nn.Sequential whose fold gives the model\'s output on them')
        warn_user(f'zennit_bnfuse: could not trace the forward of {type(model).__name__} with torch.fx '
                  f'({report.trace_error}); {done} (see the report).')
    return report


# the methods by which timm.utils.model.reparameterize_model merges a block's train-time branches and BatchNorms
REPARAMETERIZE_METHODS = ('fuse', 'reparameterize', 'switch_to_deploy')


def reparameterization_hint(name, modules):
    '''A hint for the BatchNorm ``name`` where it sits in a block that timm re-parameterises for inference (one with
    a method of :py:data:`REPARAMETERIZE_METHODS`: RepVGG, MobileOne, FastViT, RepViT, LeViT's ``LinearNorm``, ...),
    else an empty string.'''
    parents = [parent for parent, module in modules.items() if (name == parent or name.startswith(f'{parent}.'))
               and type(module).__module__.startswith('timm.')
               and any(callable(getattr(module, method, None)) for method in REPARAMETERIZE_METHODS)]
    if not parents:
        return ''
    parent = max(parents, key=len)
    method = next(method for method in REPARAMETERIZE_METHODS if callable(getattr(modules[parent], method, None)))
    return (f'; it sits in `{parent}` ({type(modules[parent]).__name__}), which timm re-parameterises for inference '
            f'(`{method}()`): call timm.utils.model.reparameterize_model(model) first, which merges its branches and '
            'BatchNorms into convolutions and linear layers')


def keep_common_folds(report, other, values):
    '''Move the folds of ``report`` that ``other``, a report for the same model traced with the argument ``values``,
    does not make alike to ``report.unfused``; the same for its standardised convolutions.

    Parameters
    ----------
    report, other: :py:class:`~zennit_bnfuse.report.FusionReport`
        ``report`` is changed in place.
    values: dict[str, object]
        The ``concrete_args`` ``other`` was traced with, for the reason.
    '''
    described = ', '.join(f'{name}={value!r}' for name, value in values.items())
    reason = (
        f'the forward decides its fold otherwise where it runs with {described} than with every argument a tensor, '
        'so no fold is exact on both paths' if other.traced else
        f'the forward could not be traced where it runs with {described} ({other.trace_error}), so no fold found '
        'with every argument a tensor is proven where they are left out (pass example_inputs to check the folds on '
        'them)')
    unfused = [UnfusedBatchNorm(entry.bn, (
        f'{reason} (FusedLRP and CompositeLRP trace each call with its own values; for fuse(), pass concrete_args '
        'for the calls you make)')) for entry in report.fused if entry not in other.fused]
    report.fused = [entry for entry in report.fused if entry in other.fused]
    report.unfused.extend(unfused)
    report.standardized = [name for name in report.standardized if name in other.standardized]


def has_own_forward(module):
    '''Whether ``module`` is a module with a ``forward`` assigned on the instance (``model.forward = ...``).'''
    return isinstance(module, torch.nn.Module) and 'forward' in vars(module)


def has_hooks(module):
    '''Whether ``module`` has forward, forward-pre or backward hooks of its own.'''
    return any(getattr(module, key, None) for key in (
        '_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks'))


def relu_fold_problem(batch_norm):
    '''Why ``batch_norm -> ReLU`` cannot become a thresholded ReLU in the BatchNorm's dtype, or None: the threshold
    ``shift / |scale|`` must be finite there (a tiny scale overflows float16).'''
    _, threshold, next_scale = relu_fold(*batch_norm_affine(batch_norm))
    dtype = batch_norm.running_mean.dtype
    limit = torch.finfo(dtype).max
    if threshold.abs().max() > limit or next_scale.max() > limit:
        return f'its scale is too small for {dtype}: the thresholded ReLU\'s threshold would overflow'
    return None


def describe(node, modules):
    '''Name an fx node the way a user reads it: a module name and type, a function, a method or the model input.'''
    if not isinstance(node, torch.fx.Node):
        return f'the constant {node!r}'
    if node.op == 'call_module':
        return f'`{node.target}` ({type(modules[node.target]).__name__})'
    if node.op == 'call_function':
        if node.target is operator.getitem and node.args and isinstance(node.args[0], torch.fx.Node):
            index = node.args[1] if len(node.args) > 1 else None
            item = f'item {index}' if isinstance(index, int) else 'a slice'
            return f'{item} of {describe(node.args[0], modules)}'
        symbol = {operator.add: '+', operator.iadd: '+=', operator.mul: '*', operator.getitem: '[]',
                  operator.setitem: '[] ='}.get(node.target)
        if symbol is not None:
            return f'`{symbol}`'
        module = getattr(node.target, '__module__', None) or ''
        module = {'torch.nn.functional': 'F', 'torch._C._nn': 'F', 'torch.functional': 'torch'}.get(module, module)
        return f'`{module + "." if module else ""}{getattr(node.target, "__name__", node.target)}`'
    if node.op == 'call_method':
        return f'`.{node.target}()`'
    if node.op == 'placeholder':
        return f'the model input `{node.target}`'
    if node.op == 'output':
        return 'the model output'
    return f'the attribute `{node.target}`'


class _GraphAnalysis:
    '''Decide, for each BatchNorm call in one fx graph, how (or why not) it folds.

    Parameters
    ----------
    graph: :py:obj:`torch.fx.Graph`
        The traced graph; module targets are relative to ``prefix``.
    prefix: str
        Name of the traced module inside the model ('' for the model itself).
    modules: dict[str, :py:obj:`torch.nn.Module`]
        All named modules of the model.
    aliases: Counter
        How many names each module (by id) is registered under.
    hooked_calls: list[:py:class:`HookedCall`]
        The calls of modules with hooks the tracer saw.
    '''
    def __init__(self, graph, prefix, modules, aliases, hooked_calls=()):
        self.graph = graph
        self.hooked_calls = hooked_calls
        self.prefix = f'{prefix}.' if prefix else ''
        self.modules = modules
        self.aliases = aliases
        self.calls = Counter(self.name(node) for node in graph.nodes if node.op == 'call_module')
        self.read_directly = {
            self.prefix + node.target.rpartition('.')[0] for node in graph.nodes if node.op == 'get_attr'
        }

    def name(self, node):
        '''Full module name of a ``call_module`` node.'''
        return self.prefix + node.target

    def module(self, node):
        '''The module a node calls, or None.'''
        if isinstance(node, torch.fx.Node) and node.op == 'call_module':
            return self.modules[self.name(node)]
        return None

    def describe(self, node):
        '''Describe a node with full module names.'''
        if isinstance(node, torch.fx.Node) and node.op == 'call_module':
            return f'`{self.name(node)}` ({type(self.module(node)).__name__})'
        return describe(node, self.modules)

    def describe_users(self, node, exclude=None):
        '''Describe the users of ``node`` other than ``exclude``.'''
        return ', '.join(self.describe(user) for user in node.users if user is not exclude)

    def usage_problem(self, node):
        '''Why the module called by ``node`` cannot be replaced, or None.'''
        name = self.name(node)
        if self.calls[name] != 1:
            return f'`{name}` is called {self.calls[name]} times in forward'
        if name in self.read_directly:
            return f'the parameters of `{name}` are also read directly in forward'
        module = self.modules[name]
        if self.aliases[id(module)] > 1:
            return f'`{name}` is registered under several names'
        if has_hooks(module):
            return f'`{name}` has forward or backward hooks (weight_norm or your own), which fusion would bypass'
        return None

    def descriptions(self, nodes):
        '''The descriptions of ``nodes`` (:py:meth:`describe`), as a tuple.'''
        return tuple(self.describe(node) for node in nodes)

    def hook_problem(self, changed):
        '''Why hooks stop a fold that changes the values of the ``changed`` nodes, or None: a module with hooks sees
        one of them (as its input, or as its output unless its hooks are forward pre-hooks only). Such a module is a
        ReLU or dropout between the BatchNorm and the layer, or a block holding one of them but not the other (timm's
        ``FeatureHookNet`` hooks blocks).'''
        for call in self.hooked_calls:
            seen = [node for node in (*call.inputs, *(call.outputs if call.sees_output else ())) if node in changed]
            if seen:
                name = self.prefix + call.name
                return (f'`{name}` ({type(self.modules[name]).__name__}) has hooks that see '
                        f'{self.describe(seen[0])}, whose values the fold would change')
        return None

    def layer_problem(self, node, channels, input_node=None, flatten=False):
        """Why the layer called by ``node`` cannot take a fold of ``channels`` channels, or None.

        The fold goes on the layer's output side, or on its input side if ``input_node`` (the node the layer reads)
        is given; ``flatten`` says a channel-major flatten sits in between.
        """
        layer = self.module(node)
        name = self.name(node)
        problem = layer_kind_problem(layer)
        if problem:
            return f'`{name}` {problem}'
        problem = self.usage_problem(node)
        if problem:
            return problem
        if input_node is None:
            count = getattr(layer, 'out_channels', getattr(layer, 'out_features', None))
            if count != channels:
                return f'`{name}` has {count} output channels but the BatchNorm has {channels}'
            return None
        if isinstance(layer, TRANSPOSED_TYPES):
            return f'`{name}` is a transposed convolution, whose input side takes no fold'
        if not node.args or node.args[0] is not input_node:
            return f'`{name}` takes it as an argument other than its input'
        count = getattr(layer, 'in_channels', getattr(layer, 'in_features', None))
        if flatten and count % channels:
            return f'`{name}` has {count} input features, not a multiple of the {channels} channels'
        if not flatten and count != channels:
            return f'`{name}` has {count} input channels but the BatchNorm has {channels}'
        return None

    def decide(self, decided):
        '''Fill ``decided`` (BN name -> FusedBatchNorm or UnfusedBatchNorm) for every BN call in this graph.'''
        claimed_inputs = set()
        for node in self.graph.nodes:
            batch_norm = self.module(node)
            if batch_norm is None or not is_batch_norm(batch_norm):
                continue
            name = self.name(node)
            decided[name] = self.decide_one(node, name, batch_norm, claimed_inputs)

    def decide_one(self, node, name, batch_norm, claimed_inputs):
        '''How the BatchNorm called by ``node`` folds, as FusedBatchNorm or UnfusedBatchNorm.'''
        problem = batch_norm_kind_problem(batch_norm)
        if problem:
            return UnfusedBatchNorm(name, problem)
        if not has_running_stats(batch_norm):
            return UnfusedBatchNorm(
                name, 'it has no running statistics (its running_mean and running_var are None, as with '
                'track_running_stats=False), so it normalises every batch by its own statistics, which no fixed '
                'layer can reproduce')
        problem = self.usage_problem(node)
        if problem:
            return UnfusedBatchNorm(name, problem)
        channels = batch_norm.running_mean.shape[0]

        source = node.args[0] if node.args else None
        fold, before_reason = self.previous_fold(source, node, name, channels)
        if fold is not None:
            return fold

        fold, after_reason = self.next_fold(node, name, channels, claimed_inputs)
        if fold is not None and fold.side == 'before-relu':
            after_reason = relu_fold_problem(batch_norm)
        if fold is not None and fold.side == 'before' and source is not None:
            # folded away, the BatchNorm leaves an identity: its output is its input, no longer a copy
            writer = written_after(node, source, self.module)
            if writer is not None:
                after_reason = (f'{self.describe(writer)} writes in place into its input after it reads it; folded '
                                'into the next layer, the BatchNorm would pass on its input as it is, and the layer '
                                'would read the written values')
        if fold is not None and after_reason is None:
            claimed_inputs.update(fold.layers)
            return fold
        return UnfusedBatchNorm(
            name, f'cannot fold into the layer before ({before_reason}) nor the layer after ({after_reason})')

    def previous_fold(self, source, node, name, channels):
        """Fold the BatchNorm ``node`` into the layer(s) producing its input ``source``: ``(FusedBatchNorm, None)``
        or ``(None, reason)``.

        ``source`` (after any ops that are the identity in eval mode) is a layer's output, or a channel concatenation
        (``torch.cat(..., dim=1)``, as in timm's MixedConv2d) of outputs of distinct layers that nothing else reads;
        each layer then takes its own channels of the BatchNorm, in the order of the concatenation.
        """
        consumer, via = node, []
        while self.is_eval_identity(source) and len(source.users) == 1 and source.args:
            consumer, source = source, source.args[0]
            via.append(consumer)
        if not self.is_channel_cat(source, input_rank(self.module(node))):
            problem = self.previous_problem(source, consumer, node, channels) or self.hook_problem({source, *via})
            if problem:
                return None, problem
            return FusedBatchNorm(name, self.name(source), 'after', self.descriptions(reversed(via))), None
        parts = list(cat_operands(source)[0])
        problem = None
        if len(source.users) > 1:
            problem = f'its output also feeds {self.describe_users(source, exclude=consumer)}'
        elif len(set(parts)) != len(parts):
            problem = 'it concatenates a tensor with itself'
        counts = [getattr(self.module(part), 'out_channels', getattr(self.module(part), 'out_features', 0))
                  for part in parts]
        for part, count in zip(parts, counts):
            if problem:
                break
            if not is_layer_like(self.module(part)):
                problem = f'{self.describe(part)} is not a conv/linear layer'
            else:
                problem = self.previous_problem(part, source, node, count)
        if problem is None and sum(counts) != channels:
            problem = f'its layers have {sum(counts)} output channels but the BatchNorm has {channels}'
        if problem:
            return None, (f'its input comes from {self.describe(source)}, not a conv/linear layer, and cannot be '
                          f'split among the tensors it concatenates: {problem}')
        names = [self.name(part) for part in parts]
        problem = self.hook_problem({source, *parts, *via})
        if problem:
            return None, problem
        return FusedBatchNorm(name, names[0], 'after', self.descriptions([source, *reversed(via)]),
                              tuple(names[1:])), None

    def is_channel_cat(self, node, rank=None):
        '''Whether ``node`` concatenates a list of tensors along dim 1 (``1 - rank`` counted from the end, for
        tensors of a known ``rank``).'''
        if not isinstance(node, torch.fx.Node) or node.op != 'call_function' or node.target not in CAT_FUNCTIONS:
            return False
        tensors, dim = cat_operands(node)
        return dim in (1, None if rank is None else 1 - rank) and isinstance(tensors, (list, tuple)) and all(
            isinstance(tensor, torch.fx.Node) for tensor in tensors)

    def previous_problem(self, source, consumer, node, channels):
        '''Why the BatchNorm ``node`` cannot fold into the layer producing ``source``, which ``consumer`` (the
        BatchNorm or a concatenation before it) reads, or None.'''
        if not is_layer_like(self.module(source)):
            return f'its input comes from {self.describe(source)}, not a conv/linear layer'
        problem = self.layer_problem(source, channels)
        if problem:
            return problem
        if isinstance(self.module(source), torch.nn.Linear) and not isinstance(self.module(node), torch.nn.BatchNorm1d):
            return f'`{self.name(source)}` is a Linear, whose features are on the last dim, not the BN\'s channel dim'
        if len(source.users) > 1:
            return f'the output of `{self.name(source)}` also feeds {self.describe_users(source, exclude=consumer)}'
        return None

    def next_fold(self, node, name, channels, claimed_inputs):
        """Follow the BatchNorm's output to the layers that read it: ``(FusedBatchNorm, None)`` or
        ``(None, reason)``.

        On its way to a layer the output may pass ops that are the identity in eval mode, then a ReLU and ops that a
        non-negative per-channel scale moves through (:py:meth:`commuting_step`). It may branch (a pre-activation
        that a conv and a projection shortcut share), as long as every branch ends in a layer that can take the fold
        and either every branch passes a ReLU (side ``'before-relu'``: the BatchNorm becomes a thresholded ReLU and
        every layer takes its scale magnitude) or none does (``'before'``: every layer takes the affine map).
        """
        found, via = [], []
        problem = self.follow(node, node, channels, False, False, found, via, ())
        if problem:
            return None, problem
        if len({rectified for _, rectified in found}) > 1:
            return None, ('some layers read its output through a ReLU and others without, so it cannot become one '
                          'thresholded ReLU')
        names = [layer for layer, _ in found]
        for layer in names:
            if layer in claimed_inputs:
                return None, f'`{layer}` already takes another fold on its input'
        problem = self.hook_problem({node, *via})
        if problem:
            return None, problem
        side = 'before-relu' if found[0][1] else 'before'
        return FusedBatchNorm(name, names[0], side, self.descriptions(dict.fromkeys(via)), tuple(names[1:])), None

    def follow(self, node, current, channels, rectified, flatten, found, via, pools):
        '''Walk from ``current`` to every layer that reads it (see :py:meth:`next_fold`), appending ``(layer name,
        rectified)`` to ``found`` and each op passed to ``via``; return the reason the walk fails, or None.
        ``rectified``, ``flatten`` and ``pools`` (the poolings passed) describe the path from the BatchNorm to
        ``current``.'''
        users = list(current.users)
        what = 'its output' if current is node else f'the output of {self.describe(current)}'
        if not users:
            return f'{what} is not used'
        for user in users:
            problem = self.follow_user(node, current, user, what, channels, rectified, flatten, found, via, pools)
            if problem:
                if len(users) > 1:
                    return f'{what} feeds {len(users)} ops ({self.describe_users(current)}), and {problem}'
                return problem
        return None

    def follow_user(self, node, current, user, what, channels, rectified, flatten, found, via, pools):
        '''One step of :py:meth:`follow`: ``user`` reads ``current``, which is described as ``what``.'''
        if is_layer_like(self.module(user)):
            problem = self.layer_problem(user, channels, input_node=current, flatten=flatten)
            if problem is None and isinstance(self.module(user), torch.nn.Linear) and not flatten \
                    and not isinstance(self.module(node), torch.nn.BatchNorm1d):
                problem = f'`{self.name(user)}` is a Linear applied to the last dim, not to the BN channels'
            if problem is None:
                problem = self.rank_problem(node, pools, self.module(user))
            if problem:
                return problem
            found.append((self.name(user), rectified))
            return None
        step = 'op'
        if rectified:
            step = self.commuting_step(user, flatten)
            if step is None:
                return f'{self.describe(user)} follows, through which its scale cannot move'
        elif self.is_relu(user):
            if pools:
                return (f'{self.describe(user)} follows {self.describe(pools[0])}, so the BatchNorm cannot become a '
                        'thresholded ReLU where it is')
        elif not self.is_eval_identity(user):
            step, problem = self.affine_step(node, user, flatten)
            if step is None:
                return f'{what} feeds {self.describe(user)}, {problem}'
        via.append(user)
        pooled = (user,) if self.pooling_dims(user) is not None else ()
        return self.follow(node, user, channels, rectified or self.is_relu(user),
                           flatten or step == 'flatten', found, via, pools + pooled)

    def rank_problem(self, node, pools, layer):
        '''Why ``layer`` cannot take the fold of the BatchNorm ``node`` through ``pools``, the poolings on the way,
        or None: a pooling pools the BatchNorm's spatial dims only where it pools as many dims as its input has after
        the batch and channel dims, else it reads the channels as a spatial dim. That number is fixed for a
        BatchNorm2d or 3d; for a BatchNorm1d (``(N, C)`` or ``(N, C, L)``) or SyncBatchNorm, a convolution's fold
        checks as it runs that its input has its own spatial dims, which the poolings keep, and a Linear's cannot.'''
        spatial = batch_norm_spatial_dims(self.module(node))
        if spatial is None and not isinstance(layer, torch.nn.Linear):
            spatial = layer.weight.ndim - 2
        pool = next((pool for pool in pools if self.pooling_dims(pool) != spatial), None)
        if pool is None:
            return None
        dims = self.pooling_dims(pool)
        kind = type(self.module(node)).__name__
        return (f'{self.describe(pool)} pools the last {dims} dim(s), the spatial dims of the BatchNorm\'s input only '
                f'where that has {dims + 2} dims; ' + (
                    f'the {kind} may take another rank (BatchNorm1d: (N, C)), which the Linear after it cannot tell, '
                    'and then' if spatial is None else f'the {kind} takes {spatial + 2}, so') +
                ' the pooling mixes its channels')

    def pooling_dims(self, node):
        '''How many trailing dims ``node`` pools, if it calls a pooling module or function of torch's or timm's
        (those :py:meth:`commuting_step` and :py:meth:`affine_step` pass), else None.'''
        module = self.module(node)
        extension = timm_layers()
        if module is not None and extension is not None and type(module) in extension.SCALE_COMMUTING_MODULES:
            return 2
        kind = type(module) if module is not None else node.target if node.op == 'call_function' else None
        return POOLING_DIMS.get(kind) if isinstance(kind, Hashable) else None

    def flattens_channel_major(self, node):
        '''None if ``node`` is no flatten (``nn.Flatten``, ``torch.flatten``, ``.flatten()``), else whether it
        flattens every dim after the batch dim, channels first.'''
        module = self.module(node)
        if module is not None:
            return module.start_dim == 1 and module.end_dim == -1 if type(module) is torch.nn.Flatten else None
        if (node.op == 'call_function' and node.target is torch.flatten) or (
                node.op == 'call_method' and node.target == 'flatten'):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get('start_dim', 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get('end_dim', -1)
            return start == 1 and end == -1
        return None

    def affine_step(self, node, user, flattened):
        """Whether the BatchNorm ``node``'s per-channel affine map ``s x + t`` moves through ``user`` unchanged, on
        the way to the layer after it: ``('op', None)`` or ``('flatten', None)`` (a channel-major flatten, at most
        one, after any pooling), else ``(None, reason)``.

        It moves through average pooling whose every output averages real inputs (adaptive, or without zero padding
        or with ``count_include_pad=False``, and without ``divisor_override``): the average of ``s x + t`` is
        ``s`` times the average plus ``t``. It moves through max pooling where ``s >= 0`` in every channel.
        """
        channel_major = self.flattens_channel_major(user)
        if channel_major is not None:
            return ('flatten', None) if channel_major and not flattened else (
                None, 'which does not flatten channel-major once')
        module = self.module(user)
        if module is not None:
            kind, settings = type(module), vars(module)
        elif user.op == 'call_function' and user.target in (
                AVERAGE_POOL_FUNCTIONS | ADAPTIVE_AVERAGE_POOL_FUNCTIONS | MAX_POOL_FUNCTIONS):
            kind = user.target
            normalized = normalize_function(kind, user.args, user.kwargs, normalize_to_only_use_kwargs=True)
            if normalized is None:
                return None, 'whose arguments torch.fx cannot match to its parameters'
            settings = normalized.kwargs
        else:
            return None, NOT_PASSED
        if flattened:
            return None, 'a pooling after the flatten'
        extension = timm_layers()
        if extension is not None and kind in extension.ZERO_PADDING_POOL_TYPES:
            return None, ('which averages the zeros it pads with (\'same\' padding) into its border outputs, where the '
                          'BatchNorm\'s shift is left out')
        if kind in (*AVERAGE_POOL_MODULES, *AVERAGE_POOL_FUNCTIONS):
            padding = settings.get('padding', 0)
            padded = any(padding) if isinstance(padding, (tuple, list)) else bool(padding)
            if padded and settings.get('count_include_pad', True):
                return None, ('which averages zero padding into its border outputs (count_include_pad), where the '
                              'BatchNorm\'s shift is left out')
            if settings.get('divisor_override') is not None:
                return None, 'whose divisor_override makes it no average, which the BatchNorm\'s shift does not pass'
            return 'op', None
        if kind in (*ADAPTIVE_AVERAGE_POOL_MODULES, *ADAPTIVE_AVERAGE_POOL_FUNCTIONS):
            return 'op', None
        if kind in (*MAX_POOL_MODULES, *MAX_POOL_FUNCTIONS, *(() if extension is None else extension.MAX_POOL_TYPES)):
            if settings.get('return_indices', False):
                return None, 'which also returns indices'
            scale, _ = batch_norm_affine(self.module(node))
            negative = (scale < 0).nonzero().flatten().tolist()
            if negative:
                shown = ', '.join(map(str, negative[:5])) + (', ...' if len(negative) > 5 else '')
                return None, (f'which takes the maximum, and the BatchNorm\'s scale is negative in channel(s) '
                              f'{shown}, where it turns the maximum into the minimum')
            return 'op', None
        return None, NOT_PASSED

    def is_eval_identity(self, node):
        '''Whether ``node`` calls a module that is the identity in eval mode (identity, dropout).'''
        module = self.module(node)
        return module is not None and type(module) in EVAL_IDENTITY_MODULES and (
            not module.training or type(module) is torch.nn.Identity)

    def is_relu(self, node):
        '''Whether ``node`` applies a ReLU.'''
        module = self.module(node)
        if module is not None:
            return type(module) is torch.nn.ReLU
        if node.op == 'call_function':
            return node.target in RELU_FUNCTIONS
        return node.op == 'call_method' and node.target in RELU_METHODS

    def commuting_step(self, node, flattened):
        """``'op'`` if a non-negative per-channel scale commutes with ``node``, ``'flatten'`` for a channel-major
        flatten (at most one), None otherwise. Pooling must come before the flatten; elementwise ops anywhere."""
        channel_major = self.flattens_channel_major(node)
        if channel_major is not None:
            return 'flatten' if channel_major and not flattened else None
        module = self.module(node)
        if module is not None:
            if type(module) not in scale_commuting_modules() or module.training:
                return None
            elementwise = isinstance(module, (torch.nn.ReLU, torch.nn.Identity, torch.nn.modules.dropout._DropoutNd))
            return 'op' if elementwise or not flattened else None
        if self.is_relu(node):
            return 'op'
        if node.op == 'call_function' and node.target in SCALE_COMMUTING_FUNCTIONS and not flattened:
            return 'op'
        return None
