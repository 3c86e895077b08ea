'''Tracing a forward for one call: the arguments after the inputs that are not tensors as fixed values.

torch.fx traces every argument of a forward as a tensor-like proxy, so a forward that checks an argument
(``if mask is not None``, ``if flag``) or computes with a number (``x * scale``) is traced for one branch and with the
number as an input. :py:class:`~zennit_bnfuse.prepared.PreparedModel` traces the forward once per *call signature*
instead: every argument after the inputs that is not a tensor (None, a bool, a number or a NumPy scalar, a string, an
enum member, a dtype or device, or a tuple or list of these, such as a size) is given to the trace as the value of
this call (``concrete_args``), and so is a default the call leaves out that is a tensor or a tuple holding tensors;
the tensors given stay proxies, and so do other objects, and lists the forward changes (it fills one for its caller).
'''
import contextlib
import enum
import inspect
import operator
import random
import warnings

import numpy as np
import torch

# the values given to a trace as they are: their branches are taken and their numbers are constants of the graph
# (NumPy's scalars as the Python numbers they hold; plain tuples and lists of such values as FixedTuple / FixedList)
CONCRETE_TYPES = (type(None), bool, int, float, complex, str, enum.Enum, torch.dtype, torch.device)


class FixedTuple(tuple):
    '''A tuple of fixed values (see :py:data:`CONCRETE_TYPES`) given to a trace as one value. torch.fx would make
    each item of a plain tuple in ``concrete_args`` a placeholder of its own and generate a forward that takes the
    items flattened; a subclass it does not know is one value, which the forward reads as a tuple (a forward that
    checks ``type(size) is tuple`` sees another type: :py:class:`~zennit_bnfuse.prepared.PreparedModel` checks the
    output of each such call signature once).'''


class FixedList(list):
    '''A list of fixed values given to a trace as one value (see :py:class:`FixedTuple`); where the forward changes
    it while it is traced (it fills a list for its caller), :py:func:`trace_for_call` traces it as a proxy instead.'''


# what torch.fx records to check that a call brings the values a graph was traced for: None, or equal to the value
ASSERT_IS_NONE = torch.fx._symbolic_trace._assert_is_none


def as_argument_tuple(additional_forward_args):
    '''Captum's ``additional_forward_args`` as the tuple of arguments it passes after the inputs: none for None, a
    tuple as it is, anything else as one argument.'''
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)


def call_arguments(model, num_inputs, additional_forward_args):
    '''The values the parameters of ``model``'s forward after its ``num_inputs`` inputs get in a call with
    ``additional_forward_args`` (given by position, as Captum passes them, else the default), by parameter name.

    Parameters before a ``*args`` and keyword-only ones with a default are included; parameters that get neither
    are left out (the forward raises for them), and so is everything where more arguments are given than the forward
    takes by position without a ``*args`` (the forward raises for that).'''
    arguments = as_argument_tuple(additional_forward_args)
    parameters = forward_parameters(model)
    positional = [parameter for parameter in parameters
                  if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)][num_inputs:]
    if len(arguments) > len(positional) and not any(
            parameter.kind is parameter.VAR_POSITIONAL for parameter in parameters):
        return {}
    values = {parameter.name: argument for parameter, argument in zip(positional, arguments)}
    values.update((parameter.name, parameter.default) for parameter in (*positional[len(arguments):], *(
        parameter for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY))
        if parameter.default is not parameter.empty)
    return values


def as_concrete(value, tensors=False):
    '''``(value, fixed)``: ``value`` as a trace would take it (a NumPy scalar as the Python number it holds, a plain
    tuple or list whose items are all fixed as a :py:class:`FixedTuple` or :py:class:`FixedList` of them), and
    whether the trace takes it as a fixed value rather than a proxy; with ``tensors``, tensors count as fixed values
    too (a default the call leaves out).'''
    if isinstance(value, np.generic) and not isinstance(value, (np.datetime64, np.timedelta64)):
        value = value.item()
    if type(value) in (tuple, list, FixedTuple, FixedList):
        items = [as_concrete(item, tensors) for item in value]
        if not all(fixed for _, fixed in items):
            return value, False
        return (FixedList if isinstance(value, list) else FixedTuple)(item for item, _ in items), True
    return value, isinstance(value, CONCRETE_TYPES) or (tensors and isinstance(value, torch.Tensor))


def concrete_arguments(model, num_inputs, additional_forward_args):
    '''The arguments of ``model``'s forward after its ``num_inputs`` inputs that a trace for this call takes as
    fixed values: those given in ``additional_forward_args`` (or left at their defaults) that are not tensors.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model whose forward (its class's, which torch.fx traces) is called.
    num_inputs: int
        How many positional arguments come first as the inputs.
    additional_forward_args: object
        As in Captum's ``attribute()``: None, one argument, or a tuple of them, passed by position after the inputs.

    Returns
    -------
    dict[str, object]
        Parameter name -> value, for torch.fx's ``concrete_args`` (see :py:func:`call_arguments` for which
        parameters). A default the call leaves out that is a tensor, or a tuple holding tensors, is one too: a
        constant of the forward.
    '''
    values = call_arguments(model, num_inputs, additional_forward_args)
    given = set(list(values)[:len(as_argument_tuple(additional_forward_args))])  # the given come first
    concrete = {}
    for name, value in values.items():
        value, fixed = as_concrete(value, tensors=name not in given)
        if fixed:
            concrete[name] = value
    return concrete


def trace_for_call(tracer, root, concrete_args=None, refuse_draws=False):
    '''``tracer.trace(root, concrete_args)`` without the checks torch.fx records for ``concrete_args`` (see
    :py:func:`remove_guards`) and without the ``is_wrapped`` marks that break later traces (see
    :py:func:`unmark_wrapped_torch_functions`); torch.fx's warning that it could not add such a check (for values it
    cannot compare, such as enums) is not shown, as the graph is only run for calls with these values. A tensor
    default of the forward becomes a default of None: the call gives the tensor, or the trace holds the default as a
    constant (see :py:func:`concrete_arguments`).

    Parameters
    ----------
    tracer: :py:class:`torch.fx.Tracer`
    root: :py:obj:`torch.nn.Module`
    concrete_args: dict[str, object], optional
        See :py:func:`concrete_arguments`.
    refuse_draws: bool, optional
        Raise where the forward draws random numbers while it is traced: a graph that is run would give every call
        the draw of the trace. The random number generators are put back as they were either way.

    Returns
    -------
    :py:class:`torch.fx.Graph`

    Raises
    ------
    RuntimeError
        With ``refuse_draws``, if the forward draws random numbers while it is traced.
    Exception
        What the tracer raises for a forward it cannot trace (torch.fx raises many kinds; the tracers of this
        package a TypeError for a forward assigned on the instance).
    '''
    if concrete_args is not None:  # a tuple or list of numbers as one value (see FixedTuple)
        concrete_args = {name: as_concrete(value, tensors=True)[0] for name, value in concrete_args.items()}
    lists = {name: list(map(id, value)) for name, value in (concrete_args or {}).items()
             if isinstance(value, FixedList)}
    with warnings.catch_warnings(), drawn_numbers(root if isinstance(root, torch.nn.Module) else None) as drawn:
        warnings.filterwarnings('ignore', message='Was not able to add assertion')
        graph = tracer.trace(root, concrete_args)
    changed = [name for name, items in lists.items() if list(map(id, concrete_args[name])) != items]
    if changed:  # the forward fills the list for its caller: it takes the list as a proxy, which records that
        return trace_for_call(tracer, root, {name: value for name, value in concrete_args.items()
                                             if name not in changed}, refuse_draws)
    if refuse_draws and drawn():
        raise RuntimeError(
            f'the forward of {type(root).__name__} draws random numbers while it is traced (such as torch.randn(size) '
            'for a fixed size, which torch.fx runs once and keeps as a constant), so the graph would give every call '
            'the same draw')
    for node in list(graph.nodes):
        if node.op == 'placeholder' and node.args and graph_nodes(node.args[0]):
            # a default holding a tensor (torch.fx makes it a constant of the graph, which the generated code cannot
            # take as a default): the trace holds it as a constant where the call leaves it out (see
            # concrete_arguments)
            defaults, node.args = node.args[0], (None,)
            for default in graph_nodes(defaults):
                if not default.users:
                    graph.erase_node(default)
    return unmark_wrapped_torch_functions(remove_guards(graph, root, concrete_args or {}))


def graph_nodes(value):
    '''The :py:class:`torch.fx.Node` objects in ``value`` (nested tuples, lists and dicts included).'''
    found = []
    torch.fx.node.map_arg(value, found.append)
    return found


@contextlib.contextmanager
def drawn_numbers(root=None):
    '''Context: yields a function that tells whether a random number generator moved on inside the context: torch's
    default ones (the CPU's, and those of the CUDA devices once CUDA is initialised), NumPy's and Python's global ones,
    and the ``torch.Generator`` and NumPy ``Generator`` objects the modules of ``root`` hold as attributes. They are
    put back as they were when it ends.'''
    held = [] if root is None else [value for module in root.modules() for value in vars(module).values()
                                    if isinstance(value, (torch.Generator, np.random.Generator))]

    def states():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        own = [generator.get_state() if isinstance(generator, torch.Generator) else generator.bit_generator.state
               for generator in held]
        return [torch.get_rng_state(), *cuda], own, np.random.get_state(), random.getstate()

    def moved():
        (default, own, numpy, python), (default_after, own_after, numpy_after, python_after) = before, after
        return (len(default) != len(default_after) or not all(map(torch.equal, default, default_after))
                or not all(torch.equal(state, later) if isinstance(state, torch.Tensor) else state == later
                           for state, later in zip(own, own_after)) or numpy[0] != numpy_after[0]
                or not np.array_equal(numpy[1], numpy_after[1]) or numpy[2:] != numpy_after[2:]
                or python != python_after)
    before, after = states(), ()
    try:
        yield moved
    finally:
        after = states()
        default, own, numpy, python = before
        torch.set_rng_state(default[0])
        if len(default) > 1:
            torch.cuda.set_rng_state_all(default[1:])
        for generator, state in zip(held, own):
            if isinstance(generator, torch.Generator):
                generator.set_state(state)
            else:
                generator.bit_generator.state = state
        np.random.set_state(numpy)
        random.setstate(python)


def signature_key(concrete_args):
    '''A hashable key for ``concrete_args`` (see :py:func:`concrete_arguments`) that two calls share only where a
    graph traced for one computes what the other computes: values compared with their types (``True`` is not ``1``),
    floats and complex numbers by their text (``-0.0`` is not ``0.0``, ``nan`` is ``nan``).'''
    return tuple((name, value_key(value)) for name, value in sorted(concrete_args.items(), key=lambda item: item[0]))


def value_key(value):
    '''A hashable key for one value of ``concrete_args`` (see :py:func:`signature_key`); the items of a tuple or list
    each by their own key.'''
    if isinstance(value, (float, complex)):
        return type(value), repr(value)
    if isinstance(value, torch.Tensor):
        return type(value), id(value)
    if isinstance(value, (tuple, list)):
        return type(value), tuple(value_key(item) for item in value)
    return type(value), value


def unmark_wrapped_torch_functions(graph):
    '''Clear the ``is_wrapped`` mark of ``graph``'s calls of torch's own functions; returns ``graph``.

    Re-tracing the generated code of a GraphModule traced with ``concrete_args`` (a user's) records its
    ``torch.fx._symbolic_trace._assert_is_none`` call as a wrapped function; the code torch.fx generates for such a
    graph registers the function's dotted name for patching in globals that do not hold it, and every trace in the
    process after that fails with a KeyError. The call itself stays (it raises where the model raises).'''
    for node in graph.nodes:
        if (node.op == 'call_function' and node.meta.get('is_wrapped')
                and getattr(node.target, '__module__', '').split('.')[0] == 'torch'):
            node.meta['is_wrapped'] = False
    return graph


def forward_parameters(model):
    '''The parameters of the forward torch.fx traces for ``model`` (its class's), after ``self``; none where Python
    cannot tell them (a forward written in C): then every argument is traced as a proxy.'''
    try:
        return list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []


def placeholder_parameters(model):
    '''The parameters of ``model``'s forward in the order of the placeholders torch.fx makes for them: positional,
    keyword-only, then ``*args`` and ``**kwargs``.'''
    order = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY,
             inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return sorted(forward_parameters(model), key=lambda parameter: order.index(parameter.kind))


def remove_guards(graph, model, concrete_args):
    '''Remove from ``graph``, traced from ``model`` with ``concrete_args``, the checks torch.fx records that a call
    brings those values (``_assert_is_none`` and ``torch._assert`` of a comparison, on the placeholders of
    ``concrete_args``): the graph is only run for calls with those values (see
    :py:class:`~zennit_bnfuse.prepared.PreparedModel`), and the checks would read like computations to the analyses
    that follow. Returns ``graph``.'''
    placeholders = [node for node in graph.nodes if node.op == 'placeholder']
    fixed = {placeholder for parameter, placeholder in zip(placeholder_parameters(model), placeholders)
             if parameter.name in concrete_args}
    for placeholder in fixed:
        for user in list(placeholder.users):
            if user.op != 'call_function':
                continue
            if user.target is ASSERT_IS_NONE:
                graph.erase_node(user)
            elif user.target is operator.eq and all(
                    later.op == 'call_function' and later.target is torch._assert for later in user.users):
                for later in list(user.users):
                    graph.erase_node(later)
                graph.erase_node(user)
    return graph
