'''Which tensors of a traced forward share memory, and which in-place operations write into memory that is read
elsewhere.

Three parts of the package ask this of a :py:mod:`torch.fx` graph:

- the folds: a BatchNorm folded into the layer after it leaves an identity, so its output becomes its input, which an
  in-place op after it must not write into (:py:func:`written_after`);
- the LRP graph: an in-place op (``x += y``) can become an op with a new output, which LRP gives a rule, where nothing
  reads the memory it writes into afterwards (:py:func:`read_after`);
- :py:class:`~zennit_bnfuse.SinglePass`: a module's input kept for the backward pass must be copied where an op after
  the module writes into it (:py:func:`written_after`).

Memory is followed through the views the graph shows (:py:func:`may_alias`): known view ops, modules that may return
their input, and in-place results.
'''
import builtins
import operator

import torch
import torch.fx
import torch.nn.functional as F
import torchvision.ops

# modules that may return their input or a view of it
ALIASING_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d,
                    torch.nn.Dropout2d, torch.nn.Dropout3d, torchvision.ops.StochasticDepth)
# functions and methods that may return a view of their first tensor argument (or of each, for broadcast_tensors)
ALIASING_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.broadcast_tensors, operator.getitem, F.dropout, torchvision.ops.stochastic_depth, torch.chunk, torch.split,
    torch.tensor_split, torch.unbind, torch.narrow, torch.select, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.t, torch.diagonal, torch.detach, torch.view_as_real, torch.view_as_complex,
    torch.unflatten,
}
# tensor attributes that are views (``x.T``; fx records the access as a call of ``getattr``)
VIEW_ATTRIBUTES = {'T', 'mT', 'H', 'mH', 'real', 'imag', 'data'}
ALIASING_METHODS = {
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'permute', 'transpose', 't', 'squeeze',
    'unsqueeze', 'expand', 'expand_as', 'contiguous', 'detach', 'narrow', 'select', 'chunk', 'split', 'unbind',
    'movedim', 'to', 'float', 'double', 'half', 'bfloat16', 'type_as', 'tensor_split', 'moveaxis', 'swapaxes',
    'swapdims', 'diagonal', 'unfold', 'as_strided', 'type', 'cpu', 'cuda',
}
IN_PLACE_FUNCTIONS = {torch.relu_, F.relu_, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift}


def writes_in_place(node):
    '''Whether the fx node (a function or method call) writes its result into its first argument (``add_``,
    ``torch.relu_``, ``F.relu(..., inplace=True)``, ``x += y``; not ``operator.and_``, which is ``&``).'''
    target = node.target
    if node.op not in ('call_function', 'call_method'):
        return False
    if target in IN_PLACE_FUNCTIONS or node.kwargs.get('inplace', False):
        return True
    if isinstance(target, str):
        return target.endswith('_') and not target.startswith('__')
    return getattr(target, '__module__', None) not in ('_operator', 'operator') and getattr(
        target, '__name__', '').endswith('_')


def modules_of(root):
    '''The ``module_of`` argument of this module's functions for a graph whose ``call_module`` nodes name submodules
    of ``root``.'''
    return lambda node: root.get_submodule(node.target)


def writes_into_input(node, module_of):
    '''Whether ``node`` writes into its first argument: an in-place function or method, or a module with
    ``inplace=True`` (``module_of`` maps a ``call_module`` node to its module).'''
    if node.op == 'call_module':
        return bool(getattr(module_of(node), 'inplace', False))
    return writes_in_place(node)


def may_alias(node, module_of):
    '''Whether ``node`` may return its first argument, a view of it or an in-place result on it (``module_of`` as
    for :py:func:`writes_into_input`).'''
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == 'call_module':
        return isinstance(module_of(node), ALIASING_MODULES) or writes_into_input(node, module_of)
    if node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in VIEW_ATTRIBUTES
    return node.op in ('call_function', 'call_method') and (
        node.target in ALIASING_FUNCTIONS or node.target in ALIASING_METHODS or writes_in_place(node))


def views_of(node, module_of):
    '''``node`` and the nodes reached from it through :py:func:`may_alias` (its views, their views, in-place results
    on any of them), in the order found.'''
    found, pending = [node], [node]
    while pending:
        current = pending.pop()
        for user in current.users:
            if user not in found and user.args and user.args[0] is current and may_alias(user, module_of):
                found.append(user)
                pending.append(user)
    return found


def memory_group(node, module_of):
    '''The nodes whose tensors may share ``node``'s memory, as far as the graph shows: the tensor ``node`` is a view
    of (through :py:func:`may_alias`) and :py:func:`views_of` that.'''
    while may_alias(node, module_of):
        node = node.args[0]
    return views_of(node, module_of)


def graph_order(graph):
    '''Each node's position in ``graph``.'''
    return {node: index for index, node in enumerate(graph.nodes)}


def written_after(node, source, module_of, order=None):
    '''The first op after ``node`` in the graph that writes in place into the memory of ``source`` (or of a tensor
    sharing it, see :py:func:`memory_group`), or None. ``order``: :py:func:`graph_order` of the graph, if known.'''
    order = graph_order(node.graph) if order is None else order
    writers = [member for member in memory_group(source, module_of)
               if order[member] > order[node] and writes_into_input(member, module_of)]
    return min(writers, key=order.__getitem__, default=None)


def read_after(node, module_of, order=None):
    '''Whether the memory that the in-place op ``node`` writes into is read after it other than through ``node``'s
    result (and views of that), or belongs to the forward's inputs or the module's attributes, whose owner sees the
    write: if not, ``node`` may write into a new tensor instead. ``order`` as for :py:func:`written_after`.'''
    order = graph_order(node.graph) if order is None else order
    through_result = set(views_of(node, module_of))
    for member in memory_group(node.args[0], module_of):
        if member in through_result:
            continue
        if member.op in ('placeholder', 'get_attr'):
            return True
        if any(order[user] > order[node] for user in member.users if user not in through_result):
            return True
    return False


def inputs_written_after(graph, module_of):
    '''The targets of the ``call_module`` nodes of ``graph`` whose input an op after the call writes into in place
    (see :py:func:`written_after`).'''
    order = graph_order(graph)
    return {node.target for node in graph.nodes if node.op == 'call_module' and any(
        written_after(node, source, module_of, order) is not None for source in node.all_input_nodes)}
