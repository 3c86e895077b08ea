'''Rewriting a model's traced forward so that LRP sees every operation as its own module.

LRP implementations attach rules to modules. Two things in ordinary models escape them: a residual ``a + b`` written
in ``forward`` (relevance is then double-counted), and a module called more than once (one module, one stored input,
several uses: torchvision's BasicBlock reuses ``self.relu``). :py:func:`lrp_graph` turns every tensor addition into
a module with a rule (Captum's ``Addition_Module``, or Zennit's ``Sum`` over a stacked tensor) and gives each extra
use of a module its own copy.
'''
import copy
import operator
import warnings
from collections import Counter

import torch
import torch.fx
from captum.attr._utils.custom_modules import Addition_Module
from zennit.layer import Sum

from .fusion import set_module
from .pairs import LeafTracer

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
SHAPE_OPS = {'size', 'dim', 'numel'}


class LRPTracer(LeafTracer):
    ''':py:class:`~zennit_bnfuse.pairs.LeafTracer` that also keeps Zennit's ``Sum`` and Captum's
    ``Addition_Module`` as leaves.'''
    def is_leaf_module(self, module, module_qualified_name):
        if isinstance(module, (Sum, Addition_Module)):
            return True
        return super().is_leaf_module(module, module_qualified_name)


def is_shape_value(node):
    """Whether ``node`` computes a shape, size or count rather than a tensor."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node.op == 'call_method' and node.target in SHAPE_OPS:
        return True
    if node.op == 'call_function' and node.target in (getattr, len, operator.getitem):
        return is_shape_value(node.args[0]) or node.target is getattr
    return False


def input_dependent_nodes(graph):
    """The nodes whose value depends on the model's inputs (not only on parameters, buffers or constants)."""
    dependent = set()
    for node in graph.nodes:
        if node.op == 'placeholder' or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def is_tensor_addition(node, dependent):
    """Whether ``node`` adds two tensors that both depend on the inputs (a residual), not a constant, a buffer or
    shape arithmetic."""
    if node.op != 'call_function' or node.target not in ADD_FUNCTIONS or len(node.args) != 2 or node.kwargs:
        return False
    return all(arg in dependent and not is_shape_value(arg) for arg in node.args)


def free_name(root, scope, base):
    '''A child name under module ``scope`` of ``root`` starting with ``base`` that is not taken yet.'''
    parent = root.get_submodule(scope)
    name, index = base, 0
    while hasattr(parent, name):
        index += 1
        name = f'{base}_{index}'
    return f'{scope}.{name}' if scope else name


def lrp_graph(model, residual='captum'):
    '''An fx GraphModule of ``model`` where every tensor addition is a module and every module call its own module.

    ``torch.nn.Identity`` calls (what fusion leaves of a folded BatchNorm) are removed.

    ``model`` must be one the caller owns (a copy): its modules are shared with the result, and new modules are
    registered in it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model to rewrite.
    residual: str
        ``'captum'``: ``a + b`` becomes ``Addition_Module()(a, b)``; ``'zennit'``: it becomes
        ``Sum()(torch.stack([a, b], dim=-1))``, which Zennit's composites give the ``Norm`` rule.

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, dict[str, str]]
        The rewritten module (``model`` itself if its forward cannot be traced, with a warning) and, for each copy of
        a reused module, the name of the module it copies.
    '''
    if residual not in ('captum', 'zennit'):
        raise ValueError(f'residual must be \'captum\' or \'zennit\', not {residual!r}')
    try:
        graph = LRPTracer().trace(model)
    except Exception as error:  # fx raises many kinds of errors for untraceable code
        warnings.warn(
            f'zennit_bnfuse: could not trace the forward of {type(model).__name__} ({type(error).__name__}: {error}); '
            'residual additions stay functional and reused modules stay shared, so LRP may miscount relevance.',
            stacklevel=2,
        )
        return model, {}

    copies = {}
    uses = Counter()
    dependent = input_dependent_nodes(graph)
    for node in list(graph.nodes):
        if node.op == 'call_module' and type(model.get_submodule(node.target)) is torch.nn.Identity:
            # what is left of a folded BatchNorm: no rule, no hook, no call
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == 'call_module':
            uses[node.target] += 1
            if uses[node.target] > 1:
                scope, _, base = node.target.rpartition('.')
                name = free_name(model, scope, base)
                set_module(model, name, copy.deepcopy(model.get_submodule(node.target)))
                copies[name] = node.target
                node.target = name
        elif is_tensor_addition(node, dependent):
            # the innermost module the addition is written in; fx labels a second call of a module 'path@1', the
            # entry's first item is its real path
            stack = node.meta.get('nn_module_stack') or {}
            scope = stack[next(reversed(stack))][0] if stack else ''
            name = free_name(model, scope, 'residual_add')
            with graph.inserting_before(node):
                if residual == 'captum':
                    set_module(model, name, Addition_Module())
                    replacement = graph.call_module(name, tuple(node.args))
                else:
                    set_module(model, name, Sum())
                    # operands may broadcast against each other; their relevance is summed back over the
                    # broadcast dims by autograd
                    operands = graph.call_function(torch.broadcast_tensors, tuple(node.args))
                    stacked = graph.call_function(torch.stack, (operands,), {'dim': -1})
                    replacement = graph.call_module(name, (stacked,))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__), copies
