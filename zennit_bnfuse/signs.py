'''Which module inputs of a traced forward are non-negative whatever the model's input, read from the graph.

LRP's z+ rule splits a layer's input into its positive and negative parts; where the input cannot be negative (it
comes out of a ReLU, a max-pooling of a ReLU, ...) the negative part is zero and its half of the rule can be skipped.
Deciding that from the graph instead of the data (``input.min() >= 0``) keeps a GPU from synchronising once per layer.

Each tensor node of the :py:mod:`torch.fx` graph gets one of three signs:

- :py:data:`NON_NEGATIVE`: no entry can be negative (ReLU outputs, and what pooling, reshaping, concatenating,
  adding or multiplying only such tensors gives);
- :py:data:`SIGNED`: made by an operation the analysis knows, and may have negative entries (a conv's output);
- :py:data:`UNKNOWN`: the graph cannot tell (the model's inputs, parameters, operations the analysis does not know);
  only here is the data worth checking.

In-place operations are followed through the tensors that share memory (views, in-place results, operations the
analysis does not know): if one that may write negative values hits memory that a non-negative node lives in, the
analysis gives up and calls every input :py:data:`UNKNOWN`.
'''
import operator
from numbers import Real

import torch
import torch.fx
import torch.nn.functional as F
import torchvision.ops
from captum.attr._utils.custom_modules import Addition_Module
from zennit.core import Hook
from zennit.layer import Sum

from .aliasing import (
    ALIASING_FUNCTIONS, ALIASING_METHODS, ALIASING_MODULES, flat_nodes, modules_of, writes_in_place, written_tensors,
)
from .graph_layers import AddOperands, MeanReduction, SumReduction, scale_passing_relevance
from .layers import FOLDABLE_LAYER_TYPES, ThresholdReLU

NON_NEGATIVE = 'non-negative'
SIGNED = 'signed'
UNKNOWN = 'unknown'

# modules whose output is never negative (exact types: a subclass may compute something else)
NON_NEGATIVE_MODULES = (
    torch.nn.ReLU, torch.nn.ReLU6, ThresholdReLU, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.Softmax,
    torch.nn.Hardsigmoid,
)
# modules whose output is non-negative where their (tensor) inputs are; a view or the input itself for some
PRESERVING_MODULES = (
    torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AvgPool1d, torch.nn.AvgPool2d,
    torch.nn.AvgPool3d, torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
    torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
    torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d,
    torch.nn.Dropout2d, torch.nn.Dropout3d, torchvision.ops.StochasticDepth, Sum, AddOperands, SumReduction,
    MeanReduction, Addition_Module,
    # activations that map non-negative inputs to non-negative outputs (and may give negative ones otherwise)
    torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish, torch.nn.Mish, torch.nn.LeakyReLU, torch.nn.ELU,
    torch.nn.CELU, torch.nn.SELU,
)
# modules whose output may be negative; their output is a new tensor
SIGNED_MODULES = (*FOLDABLE_LAYER_TYPES, torch.nn.modules.batchnorm._BatchNorm, torch.nn.Tanh, torch.nn.Hardtanh)

NON_NEGATIVE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax,
    torch.exp, torch.abs, F.hardsigmoid, F.softplus,
}
NON_NEGATIVE_METHODS = {'relu', 'relu_', 'sigmoid', 'sigmoid_', 'softmax', 'exp', 'exp_', 'abs', 'abs_'}
PRESERVING_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.cat,
    torch.concat, torch.stack, torch.mean, torch.sum, torch.amax, torch.broadcast_tensors, operator.getitem,
    operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, operator.truediv,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout, F.silu, F.gelu, F.hardswish, F.mish, F.leaky_relu,
    F.elu, torchvision.ops.stochastic_depth, scale_passing_relevance,
}
PRESERVING_METHODS = {
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'permute', 'transpose', 't', 'squeeze',
    'unsqueeze', 'expand', 'expand_as', 'contiguous', 'clone', 'detach', 'mean', 'sum', 'amax', 'narrow',
    'select', 'chunk', 'split', 'unbind', 'movedim', 'add', 'add_', 'mul', 'mul_', 'div', 'div_', 'float', 'double',
    'half', 'bfloat16', 'to', 'type_as',
}
# average pooling that takes a divisor_override (its 7th argument): a negative one flips the sign
AVERAGE_POOLING_FUNCTIONS = {F.avg_pool2d, F.avg_pool3d}
SIGNED_FUNCTIONS = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, torch.tanh, F.tanh, operator.sub, operator.isub,
    operator.neg, torch.sub, torch.neg,
}
SIGNED_METHODS = {'sub', 'sub_', 'neg', 'neg_', 'tanh', 'tanh_'}
# arguments that are not tensors the result is computed from (shapes, dims, options)
DATA_ARGUMENTS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, operator.truediv,
                  'add', 'add_', 'mul', 'mul_', 'div', 'div_', scale_passing_relevance}
# keyword options of those that keep a result of non-negative operands non-negative; any other keyword (``alpha``,
# which scales add's second operand, ``out``) counts as an operand, by its sign or as unknown
SIGN_KEEPING_OPTIONS = {'rounding_mode', 'divide'}


def divisor_may_be_negative(node):
    '''Whether the functional average pooling ``node`` is given a ``divisor_override`` that is not a positive number
    (a negative one flips the sign; one computed in the forward may be negative).'''
    value = node.kwargs.get('divisor_override', node.args[6] if len(node.args) > 6 else None)
    return value is not None and not (isinstance(value, Real) and value > 0)


class ValueKeepingHook:
    '''Base of this package's own module hooks that change no value (:py:func:`own_hooks` leaves them out, as it
    does Zennit's rules').'''


def own_hooks(module, pre=False):
    '''The handle ids of ``module``'s forward hooks (``pre``: forward pre-hooks) other than Zennit rules' and this
    package's (which leave the values as they are): a user's hook may change its output (its input).'''
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    return tuple(key for key, hook in hooks.items()
                 if not isinstance(getattr(hook, '__self__', None), (Hook, ValueKeepingHook)))


def numeric_option(node, name, position, default):
    '''The option ``name`` (or the argument at ``position``) of a call node, ``default`` where it is not given; None
    for a value that is not a number (computed in the forward).'''
    value = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    return value if isinstance(value, Real) and not isinstance(value, bool) else None


def positive_option(node, name, position, default):
    '''Whether the option (see :py:func:`numeric_option`) is a positive number.'''
    value = numeric_option(node, name, position, default)
    return value is not None and value > 0


def non_negative_option(node, name, position, default):
    '''Whether the option (see :py:func:`numeric_option`) is a number of at least 0.'''
    value = numeric_option(node, name, position, default)
    return value is not None and value >= 0


def constant_sign(value):
    '''The sign of a constant operand (a number, or None for what is not one).'''
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return NON_NEGATIVE if value >= 0 else SIGNED


def combined(signs):
    '''The sign of a result that is non-negative where all its operands are.'''
    if all(sign == NON_NEGATIVE for sign in signs):
        return NON_NEGATIVE
    return UNKNOWN if UNKNOWN in signs else SIGNED


class SignAnalysis:
    '''The sign of every tensor node of ``graph`` (see the module docstring) and the sign of each module's input.

    Parameters
    ----------
    graph: :py:class:`torch.fx.Graph`
    root: :py:obj:`torch.nn.Module`
        The module whose submodules the graph's ``call_module`` nodes name.

    Attributes
    ----------
    signs: dict[:py:class:`torch.fx.Node`, str]
    gave_up: str or None
        Why every sign is :py:data:`UNKNOWN` (an in-place operation that may write negative values into memory of a
        non-negative tensor), or None.
    '''
    def __init__(self, graph, root):
        self.root = root
        self.signs = {}
        self.groups = {}  # node -> representative of the nodes sharing its memory
        self.gave_up = None
        module_of = modules_of(root)
        for node in graph.nodes:
            sign, aliases, mutated, preserving = self.visit(node)
            self.signs[node] = sign
            for other in aliases:
                self.union(node, other)
            # what it writes into besides: ``out=`` tensors, ``x[i] = v``; values of any sign
            written = [(tensor, tensor is mutated and preserving) for tensor in written_tensors(node, module_of)]
            if mutated is not None and not written:
                written = [(mutated, preserving)]
            for tensor, keeps_signs in written:
                self.union(node, tensor)
                if not keeps_signs and self.group_has_non_negative(tensor):
                    self.gave_up = f'`{node.name}` writes in place into memory that a non-negative tensor uses'
        if self.gave_up is not None:
            self.signs = dict.fromkeys(self.signs, UNKNOWN)

    def find(self, node):
        self.groups.setdefault(node, node)
        while self.groups[node] is not node:
            self.groups[node] = self.groups[self.groups[node]]
            node = self.groups[node]
        return node

    def union(self, node, other):
        self.groups[self.find(node)] = self.find(other)

    def group_has_non_negative(self, node):
        root = self.find(node)
        return any(sign == NON_NEGATIVE and self.find(other) is root for other, sign in self.signs.items())

    def operand_signs(self, node, target):
        '''The signs of the operands a result is computed from: the first argument, or all for arithmetic (with its
        scaling options, such as add's ``alpha``) and concatenation (constants by their sign, other arguments
        unknown).'''
        args = list(node.args) + list(node.kwargs.values())
        if target in DATA_ARGUMENTS:
            # both operands and the options that may change the sign (``torch.add(a, b, alpha=-1)`` is a - b)
            operands = list(node.args[:2]) + [value for key, value in node.kwargs.items()
                                              if key not in SIGN_KEEPING_OPTIONS]
            if target is not scale_passing_relevance:  # its third argument is ``divide``
                operands += node.args[2:]
        elif target in (torch.cat, torch.concat, torch.stack, torch.broadcast_tensors):
            operands = list(node.args)
        else:
            operands = args[:1]
        signs = []
        for operand in operands:
            nodes = flat_nodes(operand)
            if nodes:
                signs += [self.signs.get(other, UNKNOWN) for other in nodes]
            else:
                signs.append(constant_sign(operand) or UNKNOWN)
        return signs

    def visit(self, node):
        '''``(sign, nodes it may share memory with, node it writes into or None, whether that write keeps
        non-negative values non-negative)`` for one node.'''
        inputs = node.all_input_nodes
        if node.op == 'placeholder' or node.op == 'get_attr':
            return UNKNOWN, [], None, True
        if node.op == 'output':
            return UNKNOWN, [], None, True
        if node.op == 'call_module':
            module = self.root.get_submodule(node.target)
            kind = type(module)
            mutated = inputs[0] if getattr(module, 'inplace', False) and inputs else None
            if 'forward' in vars(module) or own_hooks(module):  # not what its type computes
                return UNKNOWN, inputs, mutated, False
            if kind is torch.nn.Softplus and not module.beta > 0:  # 1 / beta * log(1 + exp(beta * x)) <= 0
                return SIGNED, [], mutated, False
            if kind is torch.nn.Softplus and module.threshold < 0:  # x itself where beta * x > threshold
                return combined([self.signs.get(other, UNKNOWN) for other in inputs]), [], mutated, False
            if kind in NON_NEGATIVE_MODULES:
                return NON_NEGATIVE, [], mutated, True
            if (getattr(module, 'divisor_override', None) or 0) < 0:  # an average pooling that negates
                return SIGNED, [], mutated, False
            if kind in PRESERVING_MODULES:
                aliases = inputs[:1] if kind in ALIASING_MODULES else []
                return combined([self.signs.get(other, UNKNOWN) for other in inputs]), aliases, mutated, True
            if isinstance(module, SIGNED_MODULES):
                return SIGNED, [], mutated, False
            return UNKNOWN, inputs, mutated, False
        # call_function or call_method
        target = node.target
        mutated = inputs[0] if writes_in_place(node) and inputs else None
        if target == operator.getitem and node.args and node.args[0].op != 'placeholder' and (
                node.args[0].target is torch.broadcast_tensors):
            # one operand of broadcast_tensors: that operand's sign and memory
            source = node.args[0].args[node.args[1]]
            return self.signs.get(source, UNKNOWN), [source], None, True
        if target is F.softplus and not positive_option(node, 'beta', 1, default=1.):
            return SIGNED, [], mutated, False
        if target is F.softplus and not non_negative_option(node, 'threshold', 2, default=20.):
            return combined(self.operand_signs(node, target)), [], mutated, False
        if target in NON_NEGATIVE_FUNCTIONS or target in NON_NEGATIVE_METHODS or self.is_clamp_at_zero(node):
            return NON_NEGATIVE, [], mutated, True
        if target in AVERAGE_POOLING_FUNCTIONS and divisor_may_be_negative(node):
            return SIGNED, [], mutated, False
        if target in PRESERVING_FUNCTIONS or target in PRESERVING_METHODS:
            sign = combined(self.operand_signs(node, target))
            aliases = inputs[:1] if target in ALIASING_FUNCTIONS or target in ALIASING_METHODS else []
            return sign, aliases, mutated, sign == NON_NEGATIVE
        if target in SIGNED_FUNCTIONS or target in SIGNED_METHODS:
            return SIGNED, [], mutated, False
        return UNKNOWN, inputs, mutated, False

    @staticmethod
    def is_clamp_at_zero(node):
        '''Whether ``node`` is ``clamp``/``clamp_min`` with a non-negative lower bound and no upper bound below it
        (function or method; torch gives the upper bound everywhere where it is below the lower).'''
        if node.target not in (torch.clamp, torch.clamp_min, 'clamp', 'clamp_', 'clamp_min', 'clamp_min_'):
            return False
        low = node.kwargs.get('min', node.args[1] if len(node.args) > 1 else None)
        high = node.kwargs.get('max', node.args[2] if len(node.args) > 2 else None)
        return constant_sign(low) == NON_NEGATIVE and (
            high is None or (isinstance(high, Real) and not isinstance(high, bool) and high >= low))

    def module_inputs(self):
        '''For each module the graph calls, the sign of its first input over all its calls: non-negative if every
        call's is, unknown if any call's is, signed otherwise.'''
        result = {}
        for node, sign in self.signs.items():
            if node.op != 'call_module' or not node.args:
                continue
            nodes = flat_nodes(node.args[0])
            input_sign = combined([self.signs.get(other, UNKNOWN) for other in nodes]) if nodes else UNKNOWN
            if own_hooks(self.root.get_submodule(node.target), pre=True):  # may change what the module gets
                input_sign = UNKNOWN
            result[node.target] = combined([result[node.target], input_sign]) if node.target in result else input_sign
        return result
