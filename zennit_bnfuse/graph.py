'''Rewriting a model's traced forward so that LRP sees every operation as its own module.

LRP implementations attach rules to modules; every other op passes relevance by its plain gradient. That is right for
ops that only move, copy or select values (``torch.cat``, ``chunk``, indexing, ``view``, ``permute``, ...), but not
for ops that combine values, and a module called more than once (torchvision's BasicBlock reuses ``self.relu``) has
one stored input for several uses. :py:func:`lrp_graph` rewrites the traced forward:

- a residual ``a + b`` of two input-dependent tensors becomes a module with a rule (Captum's ``Addition_Module``,
  Zennit's ``Sum`` over the stacked operands, or :py:class:`~zennit_bnfuse.graph_layers.AddOperands`, the ``Sum`` that
  SinglePass computes without stacking);
- ``x.mean(dims)``, ``x.sum(dims)``, ``torch.mean`` and ``torch.sum`` become
  :py:class:`~zennit_bnfuse.graph_layers.MeanReduction`/:py:class:`~zennit_bnfuse.graph_layers.SumReduction`
  (subclasses of Zennit's ``Sum``);
- ``F.avg_pool*``, ``F.max_pool*``, ``F.adaptive_avg_pool*`` and ``F.adaptive_max_pool*`` become the torch.nn
  pooling modules, and functional activations (``F.relu``, ``torch.sigmoid``, ...) the torch.nn activations;
- ``F.linear``, ``F.conv*`` and ``F.conv_transpose*`` with a weight (and bias) the model holds as it is, such as the
  fixed filter of timm's ``BlurPool2d``, become the torch.nn layer with that weight, and ``x @ W`` (``matmul``,
  ``mm``) with a held matrix ``W`` a ``Linear`` with weight ``W.T``;
- a product with a constant (``x * 0.5``, ``x * self.gamma``, ``x / 6``) or with a gate (``x * sigmoid(...)``, as in
  squeeze-and-excitation blocks) becomes
  :py:func:`~zennit_bnfuse.graph_layers.scale_passing_relevance`: the relevance passes to ``x`` unchanged and none
  to the factor;
- timm's BatchNorm + activation modules are split into a plain BatchNorm and their drop and activation modules;
- every extra use of a module gets its own copy, and ``torch.nn.Identity`` calls are removed;
- for Captum, a module call whose input tensor other ops read too gets a clone of it (Captum's rules hook tensors,
  not calls).

Ops that still pass relevance by their gradient although it is not a relevance (a product of two signals, a
functional convolution with a weight computed in the forward, ``layer_norm``, in-place ops whose input is read again,
...) are listed in a warning.
'''
import copy
import functools
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from captum.attr._utils.custom_modules import Addition_Module
from zennit.layer import Sum

from .aliasing import (
    keep_write_in_result, later_readers, may_alias, memory_group, modules_of, read_after, reads_metadata, writers,
    writes_in_place, written_after, written_tensors,
)
from .graph_layers import (
    AddOperands, MeanReduction, SumReduction, is_norm_act, scale_passing_relevance, split_norm_act,
)
from .pairs import LeafTracer
from .replacements import set_module
from .specialization import trace_for_call
from .user_warnings import warn_user

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, 'add'}
# augmented assignments -> the operator fx records for them on a proxy that has none
OUT_OF_PLACE = {getattr(operator, f'i{name.rstrip("_")}'): getattr(operator, name) for name in (
    'add', 'sub', 'mul', 'truediv', 'floordiv', 'mod', 'pow', 'matmul', 'and_', 'or_', 'xor', 'lshift', 'rshift')}
# in-place methods (and torch / torch.nn.functional functions) whose name without the trailing _ computes the same
# values into a new tensor
IN_PLACE_WITH_OUT_OF_PLACE = {
    'add_', 'sub_', 'mul_', 'div_', 'true_divide_', 'pow_', 'neg_', 'abs_', 'exp_', 'log_', 'sqrt_', 'rsqrt_',
    'square_', 'reciprocal_', 'sign_', 'floor_', 'ceil_', 'round_', 'clamp_', 'clamp_min_', 'clamp_max_', 'clip_',
    'relu_', 'sigmoid_', 'tanh_', 'hardtanh_', 'leaky_relu_', 'elu_', 'celu_', 'selu_', 'rrelu_', 'threshold_',
    'nan_to_num_', 'masked_fill_', 'masked_scatter_', 'index_put_', 'index_add_', 'index_fill_', 'scatter_',
    'scatter_add_', 'addcmul_', 'addcdiv_', 'lerp_',
}
# what a residual addition can become (the ``residual`` argument of lrp_graph)
RESIDUALS = ('captum', 'zennit', 'operands')


@dataclass(frozen=True)
class ModuleSpec:
    '''How a functional op becomes a module.

    Attributes
    ----------
    name: str
        The base of the new module's name.
    module_type: type
        Called with the op's arguments after the input, by name.
    arguments: tuple[str, ...]
        The names of the op's arguments after the input, in order.
    weight_rank: int or None
        For a functional layer, the rank of the weight its module holds (2 for ``linear``, ``dims + 2`` for a
        convolution); None for other ops.
    '''
    name: str
    module_type: type
    arguments: tuple = ()
    weight_rank: int = None


def pooling_specs():
    '''Functional pooling (torch.nn.functional and its torch aliases) -> :py:class:`ModuleSpec`.'''
    arguments = {
        'avg_pool1d': ('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad'),
        'avg_pool2d': ('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad', 'divisor_override'),
        'avg_pool3d': ('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad', 'divisor_override'),
        **{f'max_pool{dims}d': ('kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode', 'return_indices')
           for dims in (1, 2, 3)},
        **{f'adaptive_avg_pool{dims}d': ('output_size',) for dims in (1, 2, 3)},
        **{f'adaptive_max_pool{dims}d': ('output_size', 'return_indices') for dims in (1, 2, 3)},
    }
    specs = {}
    for name, names in arguments.items():
        spec = ModuleSpec(name, getattr(torch.nn, ''.join(part.capitalize() for part in name.split('_'))), names)
        specs[getattr(F, name)] = spec
    # torch's own pooling functions with the same arguments and a tensor result (torch.adaptive_max_pool1d returns
    # the indices too)
    for name in ('avg_pool1d', 'max_pool1d', 'max_pool2d', 'max_pool3d', 'adaptive_avg_pool1d'):
        specs[getattr(torch, name)] = specs[getattr(F, name)]
    return specs


def activation_specs():
    '''Functional activations (torch.nn.functional, torch and tensor methods, in-place variants included) ->
    :py:class:`ModuleSpec`; methods are keyed by their name.'''
    modules = {
        'relu': (torch.nn.ReLU, ('inplace',)), 'relu6': (torch.nn.ReLU6, ('inplace',)),
        'leaky_relu': (torch.nn.LeakyReLU, ('negative_slope', 'inplace')), 'elu': (torch.nn.ELU, ('alpha', 'inplace')),
        'gelu': (torch.nn.GELU, ('approximate',)), 'silu': (torch.nn.SiLU, ('inplace',)),
        'mish': (torch.nn.Mish, ('inplace',)), 'hardsigmoid': (torch.nn.Hardsigmoid, ('inplace',)),
        'hardswish': (torch.nn.Hardswish, ('inplace',)),
        'hardtanh': (torch.nn.Hardtanh, ('min_val', 'max_val', 'inplace')),
        'sigmoid': (torch.nn.Sigmoid, ()), 'tanh': (torch.nn.Tanh, ()),
        'softplus': (torch.nn.Softplus, ('beta', 'threshold')),
    }
    specs = {}
    for name, (module_type, names) in modules.items():
        for suffix in ('', '_'):
            spec = ModuleSpec(name, module_type, tuple(key for key in names if not suffix or key != 'inplace'))
            for namespace in (F, torch):
                if hasattr(namespace, name + suffix):
                    specs.setdefault(getattr(namespace, name + suffix), spec)
            if hasattr(torch.Tensor, name + suffix):
                specs[name + suffix] = spec
    return specs


REDUCTION_SPECS = {
    **{key: ModuleSpec('mean', MeanReduction, ('dim', 'keepdim', 'dtype')) for key in (torch.mean, 'mean')},
    **{key: ModuleSpec('sum', SumReduction, ('dim', 'keepdim', 'dtype')) for key in (torch.sum, 'sum')},
}
MODULE_SPECS = {**pooling_specs(), **activation_specs(), **REDUCTION_SPECS}


def layer_specs():
    '''Functional layers (torch.nn.functional; torch's own functions are the same objects) -> :py:class:`ModuleSpec`
    whose arguments start with ``weight`` and ``bias``.'''
    specs = {F.linear: ModuleSpec('linear', torch.nn.Linear, ('weight', 'bias'), weight_rank=2)}
    for dims in (1, 2, 3):
        specs[getattr(F, f'conv{dims}d')] = ModuleSpec(
            f'conv{dims}d', getattr(torch.nn, f'Conv{dims}d'),
            ('weight', 'bias', 'stride', 'padding', 'dilation', 'groups'), weight_rank=dims + 2)
        specs[getattr(F, f'conv_transpose{dims}d')] = ModuleSpec(
            f'conv_transpose{dims}d', getattr(torch.nn, f'ConvTranspose{dims}d'),
            ('weight', 'bias', 'stride', 'padding', 'output_padding', 'groups', 'dilation'), weight_rank=dims + 2)
    return specs


LAYER_SPECS = layer_specs()
# signal @ held matrix
MATMULS = {operator.matmul, torch.matmul, torch.mm, 'matmul', 'mm'}


def layer_with_weight(layer_type, weight, bias, geometry):
    '''A ``layer_type`` (Linear, Conv or ConvTranspose of any dims) that computes ``F.<layer>(input, weight, bias,
    **geometry)``: its parameters are new Parameter objects on ``weight``'s and ``bias``'s data (a rule that changes
    one layer's weight changes no other), ``requires_grad`` as theirs.

    Parameters
    ----------
    layer_type: type
        ``torch.nn.Linear``, ``torch.nn.Conv{1,2,3}d`` or ``torch.nn.ConvTranspose{1,2,3}d``.
    weight: :py:obj:`torch.Tensor`
        Shaped as ``layer_type``'s weight: ``(out, in)``, ``(out, in / groups, *kernel)`` or, transposed,
        ``(in, out / groups, *kernel)``.
    bias: :py:obj:`torch.Tensor` or None
        Shaped ``(out,)``.
    geometry: dict
        The functional's other arguments by name (``stride``, ``padding``, ``groups``, ...).
    '''
    if layer_type is torch.nn.Linear:
        sizes = {'in_features': weight.shape[1], 'out_features': weight.shape[0]}
    else:
        groups = geometry.get('groups', 1)
        transposed = issubclass(layer_type, torch.nn.modules.conv._ConvTransposeNd)
        inputs, outputs = weight.shape[:2]
        inputs, outputs = (inputs, outputs * groups) if transposed else (outputs * groups, inputs)
        sizes = {'in_channels': inputs, 'out_channels': outputs, 'kernel_size': tuple(weight.shape[2:])}
    with torch.device('meta'):  # the parameters are replaced: nothing to initialise
        layer = layer_type(**sizes, **geometry, bias=bias is not None)
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return layer


# products: function or method -> whether it divides
PRODUCTS = {operator.mul: False, operator.imul: False, torch.mul: False, operator.truediv: True,
            operator.itruediv: True, torch.div: True, torch.true_divide: True,
            'mul': False, 'mul_': False, 'div': True, 'div_': True, 'true_divide': True}
# ops through which a gate keeps being a gate
RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.permute, torch.transpose}
RESHAPE_METHODS = {'view', 'view_as', 'reshape', 'reshape_as', 'expand', 'expand_as', 'flatten', 'unsqueeze',
                   'squeeze', 'permute', 'transpose', 'contiguous'}
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax}
GATE_METHODS = {'sigmoid', 'softmax'}
# ops whose gradient hands each input its relevance exactly: they move, copy or select values
EXACT_FUNCTIONS = {
    *RESHAPE_FUNCTIONS, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.chunk, torch.split,
    torch.tensor_split, torch.narrow, torch.flip, torch.roll, torch.clone, torch.broadcast_tensors, operator.getitem,
    operator.setitem, F.pad, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.channel_shuffle,
    F.pixel_shuffle, F.pixel_unshuffle, torchvision.ops.stochastic_depth, scale_passing_relevance,
    # max pooling's gradient hands each window's relevance to its maximum, as LRP-epsilon does
    *(getattr(F, f'{kind}max_pool{dims}d_with_indices') for kind in ('', 'adaptive_') for dims in (1, 2, 3)),
}
EXACT_METHODS = {*RESHAPE_METHODS, 'unflatten', 'repeat', 'chunk', 'split', 'narrow', 'flip', 'roll', 'clone', 'to',
                 'type', 'type_as', 'float', 'double', 'half', 'bfloat16', 'cpu', 'cuda', '__setitem__'}
# sums that give a tensor unchanged where the other operand is the number 0 (timm's MobileOne blocks start their sum
# of branches at ``0``): their gradient hands the tensor its relevance; the tensor must come first for a difference
SUMS_WITH_ZERO = {operator.add, operator.iadd, torch.add, 'add', 'add_'}
DIFFERENCES_WITH_ZERO = {operator.sub, operator.isub, torch.sub, 'sub', 'sub_'}


class LRPTracer(LeafTracer):
    ''':py:class:`~zennit_bnfuse.pairs.LeafTracer` that also keeps Zennit's ``Sum``, Captum's ``Addition_Module``
    and timm's norm-act modules as leaves. An augmented assignment on a tensor (``x += y``) stays the in-place
    operator the base records (:py:class:`~zennit_bnfuse.pairs.InPlaceProxy`): every tensor sharing ``x``'s memory
    sees the write, in the model and in the graph module. On anything else (an int from a shape, a number argument)
    it becomes the out-of-place operator again, as generated code would rebind the operand's name.

    Parameters
    ----------
    leaves: collection of str, optional
        Names of further modules to keep as leaves (modules the user gives a rule, whose forward would be traced
        into and the rule never apply; see :py:meth:`~zennit_bnfuse.prepared.PreparedModel.ruled_leaves`).'''
    def __init__(self, leaves=()):
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, module, module_qualified_name):
        return module_qualified_name in self.leaves or super().is_leaf_module(module, module_qualified_name)

    def is_layer_leaf(self, module):
        return isinstance(module, (Sum, Addition_Module)) or is_norm_act(module) or super().is_layer_leaf(module)

    def trace(self, root, concrete_args=None):
        graph = super().trace(root, concrete_args)
        signals = signal_nodes(graph)
        for node in graph.nodes:
            if node.op == 'call_function' and node.target in OUT_OF_PLACE and node.args[0] not in signals:
                node.target = OUT_OF_PLACE[node.target]
        return graph


def rewritable_in_place(module):
    '''Whether ``module`` is one of torch's modules with ``inplace=True``, which the graph rewrite makes out of place
    where the forward reads the write only through its result (torch's modules honour the flag; others may not).'''
    return getattr(module, 'inplace', None) is True and type(module).__module__.startswith('torch.nn')


def writes_into_input(module):
    '''``(traced, how)``: whether the forward of ``module`` could be traced on its own, and how it writes into memory
    of its inputs, in words (its first such op), or None. The trace runs the forward's Python: give a copy
    (:py:func:`~zennit_bnfuse.pairs.tracing_copy`) of a module the caller does not own.'''
    try:
        graph = trace_for_call(LRPTracer(), module)  # leaves the random number generators as they were
    except Exception:  # fx raises many kinds of errors for untraceable code
        return False, None
    module_of = modules_of(module)
    inputs = {node for node in graph.nodes if node.op == 'placeholder'}
    for node, written in writers(graph, module_of):
        if any(not inputs.isdisjoint(memory_group(tensor, module_of)) for tensor in written):
            return True, op_name(node)
    return True, None


def carry_forward_hooks(source, target):
    '''Register the forward pre-hooks and forward hooks of ``source`` on ``target``, a GraphModule that computes
    ``source``'s forward (which does not take them over), in their order and with their options; each is called with
    ``source`` as its module, whose attributes it may read. Returns how many there were.'''
    for key, hook in source._forward_pre_hooks.items():
        target.register_forward_pre_hook(functools.partial(called_on, hook, source),
                                         with_kwargs=key in source._forward_pre_hooks_with_kwargs)
    for key, hook in source._forward_hooks.items():
        target.register_forward_hook(functools.partial(called_on, hook, source),
                                     with_kwargs=key in source._forward_hooks_with_kwargs,
                                     always_call=key in source._forward_hooks_always_called)
    return len(source._forward_pre_hooks) + len(source._forward_hooks)


def called_on(hook, module, _, *arguments):
    '''``hook`` called with ``module`` in place of the module it is registered on.'''
    return hook(module, *arguments)


def without_write(node):
    '''Make the in-place op ``node`` (``x += y``, ``x.clamp_(...)``, ``torch.relu_(x)``, ``F.relu(x, inplace=True)``)
    compute the same values into a new tensor, where its out-of-place form is known; only for an op whose write is
    seen through its result only (:py:func:`~zennit_bnfuse.aliasing.keep_write_in_result`).'''
    target = node.target
    if node.op == 'call_method' and target in IN_PLACE_WITH_OUT_OF_PLACE:
        node.target = target[:-1]
    elif node.op != 'call_function':
        return
    elif target in OUT_OF_PLACE:
        node.target = OUT_OF_PLACE[target]
    elif node.kwargs.get('inplace') is True:
        node.kwargs = {**node.kwargs, 'inplace': False}
    elif getattr(target, '__name__', None) in IN_PLACE_WITH_OUT_OF_PLACE:
        for namespace in (torch, F):
            if getattr(namespace, target.__name__, None) is target and hasattr(namespace, target.__name__[:-1]):
                node.target = getattr(namespace, target.__name__[:-1])
                return


def is_number_argument(node):
    """Whether ``node`` is a forward argument whose default value is a number (a setting such as ``scale=1.``,
    not a tensor)."""
    return node.op == 'placeholder' and bool(node.args) and isinstance(node.args[0], (bool, int, float))


def shape_nodes(graph):
    """The nodes that compute a shape, size, count, dtype or device, or values from those alone, rather than a
    tensor the relevance flows through."""
    shapes = set()
    for node in graph.nodes:
        if node.op not in ('call_function', 'call_method'):
            continue
        if reads_metadata(node) or (node.all_input_nodes and all(arg in shapes for arg in node.all_input_nodes)):
            shapes.add(node)
    return shapes


def signal_nodes(graph):
    """The nodes whose value depends on the model's tensor inputs through tensors: not only on parameters,
    buffers, constants, shapes or forward arguments whose default is a number. Relevance flows through these."""
    shapes = shape_nodes(graph)
    signals = set()
    for node in graph.nodes:
        if node in shapes:
            continue
        if (node.op == 'placeholder' and not is_number_argument(node)) or any(
                arg in signals for arg in node.all_input_nodes):
            signals.add(node)
    return signals


def op_key(node):
    '''The function of a ``call_function`` node or the name of a ``call_method`` node (None for other nodes).'''
    return node.target if node.op in ('call_function', 'call_method') else None


def op_name(node):
    '''A readable name of a node's op.'''
    key = op_key(node)
    if isinstance(key, str):
        return f'Tensor.{key}'
    return getattr(key, '__name__', str(key))


def free_name(root, scope, base):
    '''A child name under module ``scope`` of ``root`` starting with ``base`` that is not taken yet.'''
    parent = root.get_submodule(scope)
    name, index = base, 0
    while hasattr(parent, name):
        index += 1
        name = f'{base}_{index}'
    return f'{scope}.{name}' if scope else name


def scope_of(node):
    '''The innermost module the traced ``node`` is written in ('' for the root); fx labels a second call of a
    module 'path@1', the entry's first item is its real path.'''
    stack = node.meta.get('nn_module_stack') or {}
    return stack[next(reversed(stack))][0] if stack else ''


def bind_arguments(node, names, tensors=()):
    '''The arguments of a call after its input, by name, or None where one is not in ``names`` or one not named in
    ``tensors`` is computed in the graph (a module needs them fixed).'''
    if len(node.args) - 1 > len(names) or any(key not in names for key in node.kwargs):
        return None
    arguments = {**dict(zip(names, node.args[1:])), **node.kwargs}
    computed = []
    torch.fx.node.map_arg(tuple(value for key, value in arguments.items() if key not in tensors), computed.append)
    return None if computed else arguments


def is_gate(node, model):
    '''Whether ``node`` is a gate: the output of a sigmoid or softmax, possibly reshaped or expanded.'''
    while op_key(node) in RESHAPE_FUNCTIONS | RESHAPE_METHODS:
        node = node.args[0]
    if node.op == 'call_module':
        name = type(model.get_submodule(node.target)).__name__.lower()
        return 'sigmoid' in name or 'softmax' in name
    return op_key(node) in GATE_FUNCTIONS | GATE_METHODS


def ops_passed_by_gradient(graph_module):
    '''The functional ops of a rewritten forward through which LRP passes relevance by their plain gradient although
    that gradient is not a relevance.

    Ops that only move, copy or select values are left out (their gradient hands each input its relevance), as are
    ops whose result reaches the output only through a gate or a constant factor of
    :py:func:`~zennit_bnfuse.graph_layers.scale_passing_relevance` (they receive no relevance).

    Parameters
    ----------
    graph_module: :py:obj:`torch.fx.GraphModule`
        A forward rewritten by :py:func:`lrp_graph`.

    Returns
    -------
    list[:py:obj:`torch.fx.Node`]
        In graph order.
    '''
    graph = graph_module.graph
    signals = signal_nodes(graph)
    module_of = modules_of(graph_module)
    receiving = set()
    pending = [node for node in graph.nodes if node.op == 'output']
    # an in-place op changes the tensors sharing the memory it writes into, whether or not the forward uses its result
    in_place = writers(graph, module_of)
    while pending:
        while pending:
            node = pending.pop()
            if node in receiving:
                continue
            receiving.add(node)
            pending.extend(node.args[:1] if node.target is scale_passing_relevance else node.all_input_nodes)
        pending = [node for node, written in in_place if node not in receiving and any(
            not receiving.isdisjoint(memory_group(tensor, module_of)) for tensor in written)]
    return [node for node in graph.nodes
            if node.op in ('call_function', 'call_method') and node in receiving and node in signals
            and op_key(node) not in EXACT_FUNCTIONS | EXACT_METHODS and not adds_zero(node)]


def adds_zero(node):
    '''Whether ``node`` adds the number 0 to a tensor, or subtracts it from one (``x + 0``, ``0 + x``, ``x - 0``,
    ``x.add_(0)``), which gives the tensor unchanged.'''
    key = op_key(node)
    if key not in SUMS_WITH_ZERO | DIFFERENCES_WITH_ZERO or node.kwargs or len(node.args) != 2:
        return False
    numbers = [arg for arg in node.args if type(arg) in (int, float) and arg == 0]
    tensors = [arg for arg in node.args if isinstance(arg, torch.fx.Node)]
    return len(numbers) == len(tensors) == 1 and (key in SUMS_WITH_ZERO or node.args[0] is tensors[0])


class GraphRewrite:
    '''The rewrite of one traced ``graph`` of ``model`` (see :py:func:`lrp_graph`); ``model`` receives the new
    modules.'''
    def __init__(self, model, graph, residual):
        self.model = model
        self.graph = graph
        self.residual = residual
        self.copies = {}
        self.module_of = modules_of(model)
        self.kept_in_place = []  # in-place modules whose write other tensors read later

    def split_norm_acts(self):
        '''Remove ``Identity`` calls and call timm's norm-act modules as a plain BatchNorm, then drop and act.'''
        parts = {}
        for node in list(self.graph.nodes):
            if node.op != 'call_module':
                continue
            module = self.model.get_submodule(node.target)
            if type(module) is torch.nn.Identity:
                # what is left of a folded BatchNorm: no rule, no hook, no call
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)
                continue
            if node.target not in parts and is_norm_act(module):
                norm, names = split_norm_act(module)
                set_module(self.model, node.target, norm)
                parts[node.target] = names
            if node.target not in parts:
                continue
            users, last = list(node.users), node
            for name in parts[node.target]:
                with self.graph.inserting_after(last):
                    last = self.graph.call_module(f'{node.target}.{name}', (last,))
            for user in users:
                user.replace_input_with(node, last)

    def rewrite(self):
        '''Turn functional ops into modules (or relevance-passing products) and give each module call its own
        module.'''
        signals = signal_nodes(self.graph)
        uses = Counter()
        for node in list(self.graph.nodes):
            if node.op == 'call_module':
                uses[node.target] += 1
                if uses[node.target] > 1:
                    scope, _, base = node.target.rpartition('.')
                    name = free_name(self.model, scope, base)
                    set_module(self.model, name, copy.deepcopy(self.model.get_submodule(node.target)))
                    self.copies[name] = node.target
                    node.target = name
                continue
            if node not in signals:
                continue
            dtype = None
            if writes_in_place(node):
                if not keep_write_in_result(node, self.module_of):
                    continue  # it writes into memory read later through other tensors: it stays in place
                without_write(node)
                if not writes_in_place(node):  # made out of place: it may compute in a promoted dtype
                    dtype = self.written_dtype(node)
            key = op_key(node)
            if (key in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs
                    and all(arg in signals for arg in node.args)):
                replacement = self.residual_add(node)
            elif key in MODULE_SPECS:
                replacement = self.functional_module(node, MODULE_SPECS[key])
            elif key in LAYER_SPECS:
                replacement = self.functional_layer(node, LAYER_SPECS[key])
            elif key in MATMULS:
                replacement = self.held_matmul(node, signals)
            elif key in PRODUCTS:
                replacement = self.product(node, PRODUCTS[key], signals)
            else:
                replacement = None
            if replacement is not None:
                signals.add(replacement)
                node.replace_all_uses_with(replacement)
                self.graph.erase_node(node)
            if dtype is not None:
                signals.add(self.cast_result(replacement or node, dtype))
        for node in list(self.graph.nodes):  # in-place modules, one per call now
            module = self.model.get_submodule(node.target) if node.op == 'call_module' else None
            if not rewritable_in_place(module) or node not in signals:
                continue
            readers = later_readers(node, self.module_of)
            if not read_after(node, self.module_of, readers):
                # nothing sees the write but through its result: Captum's hooks need a new tensor, the single pass
                # and Zennit's hooks handle it in place (and save an allocation)
                module.inplace = self.residual != 'captum'
            elif keep_write_in_result(node, self.module_of, readers):
                module.inplace = False  # the same values in a new tensor, which later readers read now
            else:
                self.kept_in_place.append(node.target)
        for node in list(self.graph.nodes):  # weights a new layer holds now
            if node.op == 'get_attr' and not node.users:
                self.graph.erase_node(node)

    def written_dtype(self, node):
        '''A new node, before ``node`` (an in-place op made out of place), reading the dtype of the tensor it wrote
        into, where the op has several tensor operands (out of place, it may compute in a promoted dtype: a float32
        ``h += y`` with a float64 ``y`` stays float32, ``h + y`` is float64); None for an op of one tensor.'''
        if len(node.all_input_nodes) < 2:
            return None
        with self.graph.inserting_before(node):
            return self.graph.call_function(getattr, (node.args[0], 'dtype'))

    def cast_result(self, result, dtype):
        '''Make every reader of ``result`` read it cast to the dtype the node ``dtype`` gives (no copy where it has
        that dtype); returns the cast.'''
        with self.graph.inserting_after(result):
            cast = self.graph.call_method('to', (result, dtype))
        result.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        return cast

    def add_module(self, node, base, module):
        '''Register ``module`` under a free name starting with ``base`` in the module ``node`` is written in.'''
        name = free_name(self.model, scope_of(node), base)
        set_module(self.model, name, module)
        return name

    def residual_add(self, node):
        '''``a + b`` as Captum's ``Addition_Module()(a, b)``, ``AddOperands()(a, b)`` or Zennit's
        ``Sum()(torch.stack([a, b], dim=-1))``.'''
        with self.graph.inserting_before(node):
            if self.residual != 'zennit':
                module = Addition_Module() if self.residual == 'captum' else AddOperands()
                return self.graph.call_module(self.add_module(node, 'residual_add', module), node.args)
            name = self.add_module(node, 'residual_add', Sum())
            # operands may broadcast against each other; their relevance is summed back over the broadcast dims by
            # autograd
            operands = self.graph.call_function(torch.broadcast_tensors, tuple(node.args))
            stacked = self.graph.call_function(torch.stack, (operands,), {'dim': -1})
            return self.graph.call_module(name, (stacked,))

    def functional_module(self, node, spec):
        '''A call of the module ``spec`` describes in place of the functional op ``node``, or None where its
        arguments are computed, it returns indices, asks for a dtype, or writes (``inplace`` given by position) into
        an input that is read again.'''
        arguments = bind_arguments(node, spec.arguments)
        if arguments is None or arguments.get('return_indices') or arguments.get('dtype') is not None:
            return None
        arguments.pop('dtype', None)
        if arguments.pop('inplace', False) and not keep_write_in_result(node, self.module_of):
            return None
        with self.graph.inserting_before(node):
            return self.graph.call_module(self.add_module(node, spec.name, spec.module_type(**arguments)),
                                          node.args[:1])

    def functional_layer(self, node, spec):
        '''A call of a new Linear/Conv/ConvTranspose layer in place of the functional layer ``node`` whose weight
        (and bias) the model holds as it is (a parameter or buffer), or None where one is computed in the forward or
        another argument is.'''
        arguments = bind_arguments(node, spec.arguments, tensors=('weight', 'bias'))
        if arguments is None:
            return None
        weight, bias = (arguments.pop(key, None) for key in ('weight', 'bias'))
        if weight is None or not all(isinstance(tensor, torch.fx.Node) and tensor.op == 'get_attr'
                                     for tensor in (weight, bias) if tensor is not None):
            return None
        weight, bias = (None if tensor is None else operator.attrgetter(tensor.target)(self.model)
                        for tensor in (weight, bias))
        # the op checks the shapes when it runs: a weight the layer cannot hold is left to it
        if weight.dim() != spec.weight_rank or (bias is not None and bias.dim() != 1):
            return None
        with self.graph.inserting_before(node):
            layer = layer_with_weight(spec.module_type, weight, bias, arguments)
            return self.graph.call_module(self.add_module(node, spec.name, layer), node.args[:1])

    def held_matmul(self, node, signals):
        '''``x @ W`` as ``Linear`` with weight ``W.T`` (a view: new Parameter, same memory) where ``x`` is a signal and
        ``W`` a matrix the model holds as it is; None otherwise (``W @ x`` mixes another dim).'''
        if len(node.args) != 2 or node.kwargs:
            return None
        signal, matrix = node.args
        if signal not in signals or not isinstance(matrix, torch.fx.Node) or matrix.op != 'get_attr':
            return None
        matrix = operator.attrgetter(matrix.target)(self.model)
        if matrix.dim() != 2:
            return None
        with self.graph.inserting_before(node):
            layer = layer_with_weight(torch.nn.Linear, matrix.t(), None, {})
            return self.graph.call_module(self.add_module(node, 'matmul', layer), (signal,))

    def product(self, node, divide, signals):
        '''``signal * factor`` (or ``/``) as :py:func:`~zennit_bnfuse.graph_layers.scale_passing_relevance` where
        the factor is a constant or a gate; None for a product of two signals or a constant divided by a signal.'''
        if len(node.args) != 2 or node.kwargs:
            return None
        first, second = node.args
        if first in signals and second in signals:
            gates = [is_gate(first, self.model), is_gate(second, self.model)]
            if divide or gates.count(True) != 1:
                return None
            signal, factor = (second, first) if gates[0] else (first, second)
        elif first in signals:
            signal, factor = first, second
        elif second in signals and not divide:
            signal, factor = second, first
        else:
            return None
        with self.graph.inserting_before(node):
            return self.graph.call_function(scale_passing_relevance, (signal, factor, divide))

    def clone_shared_inputs(self):
        '''Give each module call its own input tensor where several ops read it: Captum's rules hook the input
        tensor, not the call, and would otherwise rescale the relevance that other readers (a ``torch.cat``, a
        relevance-passing product) hand back to it as if it were a gradient.'''
        signals = signal_nodes(self.graph)
        for node in list(self.graph.nodes):
            if node.op != 'call_module':
                continue
            if written_tensors(node, self.module_of) or (may_alias(node, self.module_of) and any(
                    written_after(node, arg, self.module_of) for arg in node.all_input_nodes)):
                # it writes into its input, or returns a view of it that a later write changes: a copy would take
                # the write or the view away
                continue
            for arg in dict.fromkeys(node.all_input_nodes):
                # readers of a shape or dtype hand no relevance back
                if arg in signals and sum(not reads_metadata(user) for user in arg.users) > 1:
                    with self.graph.inserting_before(node):
                        clone = self.graph.call_method('clone', (arg,))
                    node.replace_input_with(arg, clone)


def lrp_graph(model, residual='captum', concrete_args=None, leaves=()):
    '''An fx GraphModule of ``model`` whose forward LRP can explain: functional ops that combine values are modules
    with rules, and every module call has its own module (see the module docstring for the full list).

    ``model`` must be one the caller owns (a copy): its modules are shared with the result, and new modules are
    registered in it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model to rewrite.
    residual: str
        ``'captum'``: ``a + b`` becomes ``Addition_Module()(a, b)``, and a module reading a tensor that other ops
        read too gets a clone of it; ``'zennit'``: ``a + b`` becomes ``Sum()(torch.stack([a, b], dim=-1))``, which
        Zennit's composites give the ``Norm`` rule; ``'operands'``: it becomes
        :py:class:`~zennit_bnfuse.graph_layers.AddOperands` ``()(a, b)``, a ``Sum`` that
        :py:class:`~zennit_bnfuse.SinglePass` computes as Zennit computes the stacked form, without the stack
        (Zennit's own hooks cannot: it has two inputs).
    concrete_args: dict[str, object], optional
        Arguments of the forward to trace as fixed values (torch.fx's ``concrete_args``); the result computes the
        model's function for calls with those values only (it does not check them). By default every argument is
        traced as a tensor.
    leaves: collection of str, optional
        Names of modules without children to keep as modules whose forward is not traced into (see
        :py:class:`LRPTracer`); ``''`` keeps a model without children as it is.

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, dict[str, str]]
        The rewritten module (``model`` itself if its forward cannot be traced, with a warning) and, for each copy of
        a reused module, the name of the module it copies.

    Raises
    ------
    ValueError
        If ``residual`` is not one of ``'captum'``, ``'zennit'`` and ``'operands'``.

    Warns
    -----
    UserWarning
        If the forward cannot be traced, or if relevance still passes some functional op by its plain gradient (see
        :py:func:`ops_passed_by_gradient`).
    '''
    if residual not in RESIDUALS:
        raise ValueError(f'residual must be one of {", ".join(map(repr, RESIDUALS))}, not {residual!r}')
    tracer = LRPTracer(leaves)
    if not list(model.children()) and tracer.is_leaf_module(model, ''):
        # a model that is one layer stays that layer, named '' as the user's rules and composites name it: traced,
        # its functional op would become a module of another name
        return model, {}
    try:
        graph = trace_for_call(tracer, model, concrete_args, refuse_draws=True)
    except Exception as error:  # fx raises many kinds of errors for untraceable code
        warn_user(
            f'zennit_bnfuse: could not trace the forward of {type(model).__name__} ({type(error).__name__}: {error}); '
            'functional ops (residual additions, pooling, reductions, products) stay functional and reused modules '
            'stay shared, so LRP may miscount relevance.')
        return model, {}

    rewrite = GraphRewrite(model, graph, residual)
    rewrite.split_norm_acts()
    rewrite.rewrite()
    if residual == 'captum':
        rewrite.clone_shared_inputs()
    graph.lint()
    result = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    if carry_forward_hooks(model, result):
        warn_user(
            f'zennit_bnfuse: {type(model).__name__} has forward hooks (or pre-hooks) registered on the model itself; '
            'they run on the prepared copy as on the model, and LRP passes relevance through what they compute by '
            'its plain gradient, which no LRP rule governs. Make them modules of the model and give those a rule, '
            'or make sure their gradient is the relevance you mean.')
    writing = rewrite.kept_in_place
    if writing:
        warn_user(
            f'zennit_bnfuse: in the forward of {type(model).__name__}, {len(writing)} module(s) with inplace=True '
            f'write into a tensor that the forward reads again through a view taken before (first: `{writing[0]}`); '
            'LRP hooks may hand a module a copy of its input (Zennit\'s always do), and the write then reaches '
            'nothing the forward reads later, so the relevance may explain another function. Set inplace=False on '
            'them.')
    passed = ops_passed_by_gradient(result)
    if passed:
        counts = ', '.join(f'{name} x{count}' for name, count in Counter(map(op_name, passed)).items())
        warn_user(
            f'zennit_bnfuse: in the forward of {type(model).__name__}, LRP passes relevance through {len(passed)} '
            f'functional op(s) by their plain gradient, which no LRP rule governs: {counts} (first: '
            f'{passed[0].name}). Write them as modules and give those a rule, or make sure their gradient is the '
            'relevance you mean.')
    whole = kept_whole(result, tracer)
    if whole:
        warn_user(
            f'zennit_bnfuse: in the forward of {type(model).__name__}, {len(whole)} call(s) of what timm marks as '
            f'untraceable are kept whole (first: {whole[0]}): the layers inside them get their rules, but functional '
            'ops inside them (pooling, sums, products) pass relevance by their plain gradient, and no BatchNorm '
            'inside them is folded.')
    return result, rewrite.copies


def blocks_kept_whole(graph_module):
    '''The names of the modules ``graph_module`` (a forward :py:func:`lrp_graph` rewrote) calls that are kept whole
    only because timm marks them untraceable (see :py:meth:`~zennit_bnfuse.pairs.LeafTracer.kept_whole`), in the
    order of their first call.'''
    tracer = LRPTracer()
    return list(dict.fromkeys(node.target for node in graph_module.graph.nodes if node.op == 'call_module'
                              and tracer.kept_whole(graph_module.get_submodule(node.target))))


def kept_whole(graph_module, tracer):
    '''The calls of ``graph_module`` (a forward traced by ``tracer``, a :py:class:`~zennit_bnfuse.pairs.LeafTracer`)
    of modules and functions that timm marks as untraceable, which the graph keeps whole, in words.'''
    blocks = set(blocks_kept_whole(graph_module))
    found = []
    for node in graph_module.graph.nodes:
        if node.op == 'call_module' and node.target in blocks:
            found.append(f'`{node.target}` ({type(graph_module.get_submodule(node.target)).__name__})')
        elif node.op == 'call_function' and any(node.target is function for function in tracer.notrace_functions):
            found.append(f'`{op_name(node)}`')
    return found
