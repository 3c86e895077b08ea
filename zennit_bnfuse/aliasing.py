'''Which tensors of a traced forward share memory, and which operations write into memory that is read elsewhere.

Three parts of the package ask this of a :py:mod:`torch.fx` graph:

- the folds: a BatchNorm folded into the layer after it leaves an identity, so its output becomes its input, which an
  op after it must not write into (:py:func:`written_after`);
- the LRP graph: an in-place op (``x += y``, ``ReLU(inplace=True)``) can become an op with a new output, which LRP
  gives a rule, where nothing reads the memory it writes into afterwards but through its result
  (:py:func:`keep_write_in_result`);
- :py:class:`~zennit_bnfuse.SinglePass`: a module's input kept for the backward pass must be copied where an op after
  the module writes into it (:py:func:`inputs_written_after`).

Memory is followed through what each node's result may share (:py:func:`aliased_arguments`): views (the lists below,
and every operator whose schema returns an alias), ops that may return an input itself, ``out=`` tensors, in-place
results, and ops the analysis does not know. Writes are in-place ops, ``x[i] = v`` and ``out=``
(:py:func:`written_tensors`); writes through ``tensor.data`` outside the traced forward are not seen.
'''
import builtins
import functools
import operator

import torch
import torch.fx
import torch.nn.functional as F
import torchvision.ops

from .graph_layers import scale_passing_relevance

# modules that may return their input or a view of it
ALIASING_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity, torch.nn.modules.dropout._DropoutNd,
                    torchvision.ops.StochasticDepth)
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
# ops that may return one of their inputs itself, though their schemas do not say so (or there is none)
MAY_RETURN_INPUT = {
    'atleast_1d', 'atleast_2d', 'atleast_3d', 'type_as', 'expand_as', 'view_as', 'reshape_as', 'dropout', 'dropout1d',
    'dropout2d', 'dropout3d', 'alpha_dropout', 'feature_alpha_dropout', 'feature_dropout', 'contiguous', 'to', 'type',
    'float', 'double', 'half', 'bfloat16', 'cpu', 'cuda', 'stochastic_depth',
}
# ops whose result shares memory with each of their tensor arguments, not only the first
EACH_ARGUMENT = {torch.broadcast_tensors, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d, torch.meshgrid}
# Python's operators on tensors, and this package's relevance-passing product: new tensors
NEW_TENSOR_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.matmul, operator.neg, operator.pos, operator.abs, operator.invert, operator.and_, operator.or_,
    operator.xor, operator.lshift, operator.rshift, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, scale_passing_relevance,
}
SETITEM = {operator.setitem, '__setitem__'}
# what reads a tensor's shape, dtype or device, not its values
SHAPE_OPS = {'size', 'dim', 'numel'}
SHAPE_ATTRIBUTES = {'shape', 'ndim', 'dtype', 'device', 'layout', 'is_cuda'}
# a keyword argument not given (None is a value later_readers returns)
NOT_GIVEN = object()
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


def reads_metadata(node):
    '''Whether the fx node reads its tensor's shape, size, dtype or device only (``x.size(0)``, ``x.shape``,
    ``x.dtype``), which no write into the tensor's memory changes.'''
    return ((node.op == 'call_method' and node.target in SHAPE_OPS)
            or (node.op == 'call_function' and node.target is builtins.getattr and len(node.args) > 1
                and node.args[1] in SHAPE_ATTRIBUTES))


def modules_of(root):
    '''The ``module_of`` argument of this module's functions for a graph whose ``call_module`` nodes name submodules
    of ``root``.'''
    return lambda node: root.get_submodule(node.target)


def written_tensors(node, module_of):
    '''The nodes whose memory ``node`` writes into: its first argument for an in-place op (a function or method,
    ``x[i] = v`` as ``__setitem__``, a module with ``inplace=True``), and the tensors given as ``out=``
    (``module_of`` maps a ``call_module`` node to its module).'''
    if node.op == 'call_module':
        return node.args[:1] if getattr(module_of(node), 'inplace', False) else ()
    if node.op not in ('call_function', 'call_method'):
        return ()
    written = flat_nodes(node.kwargs.get('out'))
    if node.args and isinstance(node.args[0], torch.fx.Node) and (
            writes_in_place(node) or node.target in SETITEM):
        written.insert(0, node.args[0])
    return written


def flat_nodes(value):
    '''The fx nodes in an argument (nested lists and tuples included).'''
    if isinstance(value, torch.fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [node for item in value for node in flat_nodes(item)]
    return []


@functools.lru_cache(maxsize=None)
def returns_alias(name):
    '''Whether an overload of ``aten::name`` that writes into nothing returns an alias of an input (its schema says
    ``Tensor(a)``); None if there is no such operator.'''
    schemas = [schema for schema in torch._C._jit_get_schemas_for_operator(f'aten::{name}')
               if not any(argument.alias_info is not None and argument.alias_info.is_write
                          for argument in schema.arguments)]
    if not schemas:
        return None
    return any(value.alias_info is not None for schema in schemas for value in schema.returns)


def may_alias(node, module_of):
    '''Whether ``node``'s result may share memory with its tensor arguments (:py:func:`aliased_arguments`): a view,
    an in-place result, an op that may return its input (dropout in eval, ``atleast_2d``), or an op the analysis
    does not know; ``module_of`` as for :py:func:`written_tensors`.'''
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == 'call_module':
        return isinstance(module_of(node), ALIASING_MODULES) or bool(written_tensors(node, module_of))
    if node.op not in ('call_function', 'call_method'):
        return False
    target = node.target
    if target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in VIEW_ATTRIBUTES
    if target in ALIASING_FUNCTIONS or target in ALIASING_METHODS or writes_in_place(node):
        return True
    if target in NEW_TENSOR_FUNCTIONS:
        return False
    name = target if isinstance(target, str) else getattr(target, '__name__', '')
    if name in MAY_RETURN_INPUT:
        return True
    alias = returns_alias(name)
    return alias is None or alias  # an op the schemas do not know may alias


def aliased_arguments(node, module_of):
    '''The nodes whose memory ``node``'s result may share: the ``out=`` tensors, and where :py:func:`may_alias`,
    its first argument (for an item of ops that return a view of each argument, such as ``broadcast_tensors``, that
    item's argument).'''
    aliased = flat_nodes(node.kwargs.get('out')) if node.op in ('call_function', 'call_method') else []
    source = node.args[0] if node.target is operator.getitem and node.args else None
    if isinstance(source, torch.fx.Node) and source.target in EACH_ARGUMENT and isinstance(node.args[1], int):
        # one item of ``broadcast_tensors(a, b)``: a view of its own argument only
        tensors = flat_nodes(source.args)
        if len(tensors) > 1:
            return aliased + tensors[node.args[1]:][:1]
    if may_alias(node, module_of):
        if node.target in EACH_ARGUMENT and len(flat_nodes(node.args)) > 1:
            return aliased  # a tuple of views, each of its own argument (see above)
        aliased += node.args[:1]
    return aliased


def views_of(node, module_of):
    '''``node`` and the nodes reached from it through :py:func:`aliased_arguments` (its views, their views, in-place
    results on any of them), in the order found.'''
    found, pending = {node: None}, [node]
    while pending:
        current = pending.pop()
        for user in item_users(current):
            if user not in found and current in aliased_arguments(user, module_of):
                found[user] = None
                pending.append(user)
    return list(found)


def item_users(node):
    '''The users of ``node``, and for those that return a tuple of views of each argument (``broadcast_tensors``),
    the users of the tuple (its items).'''
    return [other for user in node.users
            for other in (user, *(user.users if user.target in EACH_ARGUMENT else ()))]


def memory_group(node, module_of):
    '''The nodes whose tensors may share ``node``'s memory, as far as the graph shows: every node connected to it
    through :py:func:`aliased_arguments`, in either direction (what it is a view of, its views, their other views).'''
    found, pending = {node: None}, [node]
    while pending:
        current = pending.pop()
        neighbours = [*aliased_arguments(current, module_of),
                      *(user for user in item_users(current) if current in aliased_arguments(user, module_of))]
        for other in neighbours:
            if other not in found:
                found[other] = None
                pending.append(other)
    return list(found)


def graph_order(graph):
    '''Each node's position in ``graph``.'''
    return {node: index for index, node in enumerate(graph.nodes)}


def writers(graph, module_of):
    '''``(node, nodes it writes into)`` for every node of ``graph`` that writes into memory, in graph order.'''
    found = []
    for node in graph.nodes:
        written = written_tensors(node, module_of)
        if written:
            found.append((node, written))
    return found


def written_after(node, source, module_of, order=None, writing=None):
    '''The first op after ``node`` in the graph that writes into the memory of ``source`` (or of a tensor sharing it,
    see :py:func:`memory_group`), or None. ``order`` (:py:func:`graph_order`) and ``writing`` (:py:func:`writers`)
    of the graph, if known.'''
    order = graph_order(node.graph) if order is None else order
    writing = writers(node.graph, module_of) if writing is None else writing
    later = [(writer, written) for writer, written in writing if order[writer] > order[node]]
    if not later:
        return None
    group = set(memory_group(source, module_of))
    return next((writer for writer, written in later if not group.isdisjoint(written)), None)


def later_readers(node, module_of):
    '''The readers after ``node`` of each tensor made before it that shares the memory ``node`` writes into, other
    than its result (and views of that): ``{tensor: [readers]}``; None where that memory belongs to the forward's
    inputs or the module's attributes, whose owner sees the write.'''
    order = graph_order(node.graph)
    through_result = set(views_of(node, module_of))
    group = {member for written in written_tensors(node, module_of) for member in memory_group(written, module_of)}
    readers = {}
    for member in group - through_result:
        if member.op in ('placeholder', 'get_attr'):
            return None
        if order[member] > order[node]:
            continue  # made after the write, from a tensor it reads after it: counted as that tensor's reader
        # a later op on the result that reads this tensor too (``y = h.relu_(); y.add_(h)``) reads it as well
        readers[member] = [user for user in member.users if order[user] > order[node] and not reads_metadata(user)
                           and not (user in through_result and member in aliased_arguments(user, module_of))]
    return readers


def read_after(node, module_of, readers=NOT_GIVEN):
    '''Whether the memory that ``node`` writes into is seen after it other than through ``node``'s result (see
    :py:func:`later_readers`; ``readers``: its result for ``node``, if known).'''
    readers = later_readers(node, module_of) if readers is NOT_GIVEN else readers
    return readers is None or any(readers.values())


def keep_write_in_result(node, module_of, readers=NOT_GIVEN):
    '''Make what the in-place op ``node`` writes visible only through its result, where that can be done, so that it
    may write into a new tensor instead: nothing to do where :py:func:`read_after` finds no reader; where only the
    tensor it writes into is read after it (by name, not through a view taken before it), its later readers are
    given ``node``'s result instead. Returns whether ``node``'s write is now seen through its result only.
    ``readers``: :py:func:`later_readers` of ``node``, if known.'''
    written = written_tensors(node, module_of)
    readers = later_readers(node, module_of) if readers is NOT_GIVEN else readers
    if len(written) != 1 or node.target in SETITEM or readers is None:
        return False
    target, = written
    if any(users for member, users in readers.items() if member is not target):
        return False
    for user in readers.get(target, ()):
        user.replace_input_with(target, node)
    return True


def inputs_written_after(graph, module_of):
    '''The targets of the ``call_module`` nodes of ``graph`` whose input an op after the call writes into (see
    :py:func:`written_after`).'''
    writing = writers(graph, module_of)
    if not writing:
        return set()
    order = graph_order(graph)
    return {node.target for node in graph.nodes if node.op == 'call_module' and any(
        written_after(node, source, module_of, order, writing) is not None for source in node.all_input_nodes)}
