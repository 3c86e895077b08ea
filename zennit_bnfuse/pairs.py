'''Finding fusable (BatchNorm, layer) pairs in a model's forward graph.

The forward is traced with :py:mod:`torch.fx`, so functional ops in ``forward`` (``torch.cat``, ``+``, ``F.relu``) are
seen. Where tracing fails, each ``nn.Sequential`` container is traced on its own with its children as leaves, so
only modules that are neighbours inside a Sequential are paired, and only folded where example inputs confirm them.
'''
import operator
import warnings
from collections import Counter

import torch
import torch.fx

from .fold import FOLDABLE_BATCH_NORM_TYPES, batch_norm_affine, check_batch_norm, has_running_stats, is_batch_norm, \
    relu_fold
from .checks import check_model
from .layers import FOLDABLE_LAYER_TYPES, ThresholdReLU
from .report import FusedBatchNorm, FusionReport, UnfusedBatchNorm
from .verification import check_folds, refuse_unproven


TRANSPOSED_TYPES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)

# ops between "BN -> ReLU" and the next layer through which a non-negative per-channel scale moves unchanged
SCALE_COMMUTING_MODULES = (
    torch.nn.ReLU, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
    torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d,
    torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d,
    torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
    torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
)
SCALE_COMMUTING_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu,
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d,
    torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d,
    torch.nn.functional.adaptive_max_pool1d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.adaptive_max_pool3d,
    torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_avg_pool3d,
}
RELU_METHODS = {'relu', 'relu_'}
RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu}


class LeafTracer(torch.fx.Tracer):
    '''fx tracer that keeps every BatchNorm (torchvision's FrozenBatchNorm2d included), every Linear/Conv layer and
    its subclasses, the modules of this package and, if given, every child of ``leaf_parent`` as one ``call_module``
    node.'''
    def __init__(self, leaf_parent=None):
        super().__init__()
        self.leaf_parent = leaf_parent

    def is_leaf_module(self, module, module_qualified_name):
        if self.leaf_parent is not None:
            return any(module is child for child in self.leaf_parent.children())
        if is_batch_norm(module) or isinstance(module, (ThresholdReLU, *FOLDABLE_LAYER_TYPES)):
            return True
        return super().is_leaf_module(module, module_qualified_name)


def find_fusable_pairs(model, example_inputs=None):
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
        must get an input of the rank its fold assumes, and, for an untraced forward, the outputs must agree.

    Returns
    -------
    :py:class:`zennit_bnfuse.report.FusionReport`
        The folds to do (``report.fused``) and the BatchNorms to leave (``report.unfused``).

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
    if not batch_norms:
        return report

    try:
        graphs = [('', LeafTracer().trace(model))]
    except Exception as error:  # fx raises many kinds of errors for untraceable code
        report.traced = False
        report.trace_error = f'{type(error).__name__}: {error}'.splitlines()[0]
        graphs = [
            (name, LeafTracer(leaf_parent=module).trace(module))
            for name, module in modules.items() if isinstance(module, torch.nn.Sequential)
        ]

    aliases = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    decided = {}
    for prefix, graph in graphs:
        _GraphAnalysis(graph, prefix, modules, aliases).decide(decided)

    where = 'in the traced (eval-mode) forward' if report.traced else 'inside an nn.Sequential'
    for name in batch_norms:
        if name not in decided:
            decided[name] = UnfusedBatchNorm(
                name, f'it is never called as a module {where} (e.g. a branch used only in training, or one called '
                'inside another leaf module), so there is no layer to pair it with')
    for entry in decided.values():
        if isinstance(entry, FusedBatchNorm):
            report.fused.append(entry)
        elif report.traced:
            report.unfused.append(entry)
        else:
            report.unfused.append(UnfusedBatchNorm(
                entry.bn, f'the forward could not be traced ({report.trace_error}); {entry.reason}'))
    if example_inputs is not None:
        check_folds(model, report, example_inputs)
    elif not report.traced:
        refuse_unproven(report)
    if not report.traced:
        done = (f'folded {len(report.fused)} of its {report.num_batch_norms} BatchNorms, those next to a conv/linear '
                'layer inside an nn.Sequential whose fold gave the model\'s output on example_inputs'
                if example_inputs is not None else
                f'folded none of its {report.num_batch_norms} BatchNorms; pass example_inputs to fold those next to '
                'a conv/linear layer inside an nn.Sequential whose fold gives the model\'s output on them')
        warnings.warn(f'zennit_bnfuse: could not trace the forward of {type(model).__name__} with torch.fx '
                      f'({report.trace_error}); {done} (see the report).', stacklevel=2)
    return report


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
        symbol = {operator.add: '+', operator.iadd: '+=', operator.mul: '*', operator.getitem: '[]'}.get(node.target)
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
    '''
    def __init__(self, graph, prefix, modules, aliases):
        self.graph = graph
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

    def layer_problem(self, node, channels, input_node=None, flatten=False):
        """Why the layer called by ``node`` cannot take a fold of ``channels`` channels, or None.

        The fold goes on the layer's output side, or on its input side if ``input_node`` (the node the layer reads)
        is given; ``flatten`` says a channel-major flatten sits in between.
        """
        layer = self.module(node)
        name = self.name(node)
        if type(layer) not in FOLDABLE_LAYER_TYPES:
            if isinstance(layer, FOLDABLE_LAYER_TYPES):
                return f'`{name}` is a {type(layer).__name__}, a subclass whose forward may differ from its base'
            return f'{self.describe(node)} is not a conv/linear layer'
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
        if type(batch_norm) not in FOLDABLE_BATCH_NORM_TYPES:
            return UnfusedBatchNorm(
                name, f'it is a {type(batch_norm).__name__}, a BatchNorm subclass whose forward may do more than '
                'normalise (e.g. apply an activation)')
        if not has_running_stats(batch_norm):
            return UnfusedBatchNorm(
                name, 'it has no running statistics (track_running_stats=False), so it normalises every batch by '
                'its own statistics, which no fixed layer can reproduce')
        problem = self.usage_problem(node)
        if problem:
            return UnfusedBatchNorm(name, problem)
        channels = batch_norm.running_mean.shape[0]

        source = node.args[0] if node.args else None
        before_reason = self.previous_problem(source, node, channels)
        if before_reason is None:
            return FusedBatchNorm(name, self.name(source), 'after')

        fold, after_reason = self.next_fold(node, name, channels, claimed_inputs)
        if fold is not None and fold.side == 'before-relu':
            after_reason = relu_fold_problem(batch_norm)
        if fold is not None and after_reason is None:
            return fold
        return UnfusedBatchNorm(
            name, f'cannot fold into the layer before ({before_reason}) nor the layer after ({after_reason})')

    def previous_problem(self, source, node, channels):
        '''Why the BatchNorm ``node`` cannot fold into the layer producing ``source``, or None.'''
        if not isinstance(self.module(source), FOLDABLE_LAYER_TYPES):
            return f'its input comes from {self.describe(source)}, not a conv/linear layer'
        problem = self.layer_problem(source, channels)
        if problem:
            return problem
        if isinstance(self.module(source), torch.nn.Linear) and not isinstance(self.module(node), torch.nn.BatchNorm1d):
            return f'`{self.name(source)}` is a Linear, whose features are on the last dim, not the BN\'s channel dim'
        if len(source.users) > 1:
            return f'the output of `{self.name(source)}` also feeds {self.describe_users(source, exclude=node)}'
        return None

    def next_fold(self, node, name, channels, claimed_inputs):
        '''Follow the BatchNorm's output to a layer: ``(FusedBatchNorm, None)`` or ``(None, reason)``.'''
        via = []
        current = node
        flatten = False
        while True:
            users = list(current.users)
            if len(users) != 1:
                what = 'its output' if current is node else f'the output of {self.describe(current)}'
                if not users:
                    return None, f'{what} is not used'
                return None, f'{what} feeds {len(users)} ops ({self.describe_users(current)})'
            user = users[0]
            if isinstance(self.module(user), FOLDABLE_LAYER_TYPES):
                layer_name = self.name(user)
                problem = self.layer_problem(user, channels, input_node=current, flatten=flatten)
                if problem is None and isinstance(self.module(user), torch.nn.Linear) and not flatten \
                        and not isinstance(self.modules[name], torch.nn.BatchNorm1d):
                    problem = f'`{layer_name}` is a Linear applied to the last dim, not to the BN channels'
                if problem is None and layer_name in claimed_inputs:
                    problem = f'`{layer_name}` already takes another fold on its input'
                if problem:
                    return None, problem
                claimed_inputs.add(layer_name)
                return FusedBatchNorm(name, layer_name, 'before-relu' if via else 'before', tuple(via)), None
            step = self.commuting_step(user, flatten)
            if step is None:
                if not via:
                    return None, f'its output feeds {self.describe(user)}, not a conv/linear layer'
                return None, f'{self.describe(user)} follows, through which its scale cannot move'
            if via == [] and not self.is_relu(user):
                return None, f'its output feeds {self.describe(user)}, not a conv/linear layer or ReLU'
            via.append(self.describe(user))
            flatten = flatten or step == 'flatten'
            current = user

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
        module = self.module(node)
        if module is not None:
            if isinstance(module, torch.nn.Flatten):
                return 'flatten' if module.start_dim == 1 and module.end_dim == -1 and not flattened else None
            if type(module) not in SCALE_COMMUTING_MODULES or module.training:
                return None
            elementwise = isinstance(module, (torch.nn.ReLU, torch.nn.Identity, torch.nn.modules.dropout._DropoutNd))
            return 'op' if elementwise or not flattened else None
        is_function = node.op == 'call_function' and node.target is torch.flatten
        if is_function or (node.op == 'call_method' and node.target == 'flatten'):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get('start_dim', 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get('end_dim', -1)
            return 'flatten' if start == 1 and end == -1 and not flattened else None
        if self.is_relu(node):
            return 'op'
        if node.op == 'call_function' and node.target in SCALE_COMMUTING_FUNCTIONS and not flattened:
            return 'op'
        return None
