'''Checks of what users pass to the public API, each raising an error that names the argument and the fix.'''
import functools
import itertools
import math
import numbers
from contextlib import contextmanager

import torch
from zennit.core import Composite

from .layers import FoldedInputError
from .registration import module_hooks
from .specialization import (
    FixedList, FixedTuple, as_argument_tuple, call_arguments, concrete_arguments, placeholder_parameters,
)


def check_model(model, caller):
    '''Raise unless ``model`` is a :py:obj:`torch.nn.Module` with no TorchScript module or wrapper in it.

    A TorchScript module (``torch.jit.script`` or ``torch.jit.trace``) runs compiled code: torch.fx cannot trace it,
    replacing its submodules does not change what it computes and hooks on them do not run, so its BatchNorms would
    stay unfused and LRP rules would not apply, without an error.

    Parameters
    ----------
    model: object
        What the user passed as the model.
    caller: str
        The function or class it was passed to, for the message (e.g. ``'fuse()'``).

    Raises
    ------
    TypeError
        If ``model`` is not a module, or it or one of its submodules is a :py:obj:`torch.jit.ScriptModule`, a
        :py:class:`torch.nn.DataParallel`, a :py:class:`~torch.nn.parallel.DistributedDataParallel` or a
        :py:func:`torch.compile` wrapper (the message names the module to pass instead), or has a backward hook from
        the deprecated ``register_backward_hook``, which tracing cannot pass.
    ValueError
        If a lazy module of ``model`` (``torch.nn.LazyConv2d``, ``LazyLinear``, ...) has not been run yet: its
        parameters have no shape, so nothing can be folded into them or read from them; or a parameter or buffer is
        on the meta device (it has no values).
    '''
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f'{caller} expects the model as a torch.nn.Module, not {type(model).__name__}.')
    wrapped = first_module(model, wrapper_attribute)
    if wrapped is not None:
        name, module, where = wrapped
        attribute = wrapper_attribute(module)
        raise TypeError(
            f'{caller} got a wrapped module: {where} a {type(module).__name__}, whose forward torch.fx cannot trace '
            f'(its BatchNorms would stay unfused and residual sums get no rule). Pass the module it wraps, '
            f'`{name + "." if name else "model."}{attribute}`: it holds the same parameters.')
    scripted = first_module(model, lambda module: isinstance(module, torch.jit.ScriptModule))
    if scripted is not None:
        _, module, where = scripted
        raise TypeError(
            f'{caller} got a TorchScript module: {where} a {type(module).__name__} (from torch.jit.script or '
            'torch.jit.trace), whose compiled forward cannot be traced, have its BatchNorms replaced or run LRP '
            'hooks. Pass the original torch.nn.Module, before torch.jit.script/torch.jit.trace.')
    lazy = first_module(model, lambda module: isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
                        and module.has_uninitialized_params())
    if lazy is not None:
        _, module, where = lazy
        raise ValueError(
            f'{caller} got a model with uninitialised parameters: {where} a {type(module).__name__}, whose parameters '
            'take their shapes from its first forward. Run the model once on an example batch (model(example)) '
            f'before passing it to {caller}.')
    legacy = first_module(model, lambda module: bool(module._backward_hooks)
                          and getattr(module, '_is_full_backward_hook', None) is False)
    if legacy is not None:
        _, module, where = legacy
        raise TypeError(
            f'{caller} got a model with a backward hook from the deprecated register_backward_hook: {where} a '
            f'{type(module).__name__} with one. torch.fx cannot trace through a module with such a hook (torch looks '
            'for a tensor in its output, which never comes). Register it with register_full_backward_hook instead.')
    empty = next((name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                  if tensor.is_meta), None)
    if empty is not None:
        raise ValueError(
            f'{caller} got a model on the meta device: `{empty}` has a shape but no values, so there is nothing to '
            'fold or explain. Give it values first (model.to_empty(device=\'cpu\'), then load_state_dict).')


# torch's hooks for every module call (torch.nn.modules.module.register_module_forward_hook and the like)
GLOBAL_HOOKS = {
    '_global_forward_pre_hooks': 'register_module_forward_pre_hook',
    '_global_forward_hooks': 'register_module_forward_hook',
    '_global_backward_pre_hooks': 'register_module_full_backward_pre_hook',
    '_global_backward_hooks': 'register_module_full_backward_hook',
}


def global_hooks():
    '''The functions of ``torch.nn.modules.module`` that registered the global module hooks registered now (the hooks
    every module call runs).'''
    return [function for name, function in GLOBAL_HOOKS.items()
            if getattr(torch.nn.modules.module, name, None)]


def refuse_global_hooks(caller):
    '''Raise if global module hooks are registered (:py:func:`global_hooks`). ``caller`` works on a fused or prepared
    copy of the model, whose modules compute other things than the model's (a folded layer computes its BatchNorm
    too, a residual sum becomes a module); the hooks, which run on every module call, would see (and may change) other
    values there than in the model.

    Raises
    ------
    RuntimeError
        If one is, naming the function that registered it and the fix.
    '''
    registered = global_hooks()
    if registered:
        raise RuntimeError(
            f'{caller} cannot work while global module hooks are registered ({", ".join(registered)} of '
            'torch.nn.modules.module): they run on every module call, and the modules of the fused or prepared copy '
            'compute other things than the model\'s (a folded layer computes its BatchNorm too), so the hooks would '
            'see, and may change, other values than in the model. Remove them first (the handle their registration '
            'returned has a remove()).')


def first_module(model, predicate):
    '''``(name, module, where)`` for the first module of ``model`` (itself included) for which ``predicate`` holds,
    ``where`` naming it for a message (``'the model is'`` or ``'its submodule `name` is'``); None if none does.'''
    for name, module in model.named_modules():
        if predicate(module):
            return name, module, 'the model is' if not name else f'its submodule `{name}` is'
    return None


def refuse_zennit_hooks(model, caller):
    '''Raise if a Zennit rule's hooks are registered on ``model`` or a submodule: a composite registered on it (inside
    an attributor's ``with`` block, or registered and never removed). ``caller`` works on a copy of the model, which
    would carry the hooks, so that their rules would act on top of its own.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The user's model.
    caller: str
        For the message (e.g. ``'FusedLRP'``).

    Raises
    ------
    ValueError
        If such a hook is registered, naming the module, the rule and the fix.
    '''
    hooked = first_module(model, lambda module: next(module_hooks(module), None) is not None)
    if hooked is not None:
        _, module, where = hooked
        hook = next(module_hooks(module))
        raise ValueError(
            f'{caller} got a model with a Zennit composite registered on it: {where} a {type(module).__name__} with '
            f'the hooks of a {type(getattr(hook, "rule", hook)).__name__} rule. {caller} works on a copy of the '
            'model, which would carry them, so their rules would act on top of its own. Remove the composite first: '
            'leave the attributor\'s `with` block, or call the composite\'s remove().')


def wrapper_attribute(module):
    '''The attribute holding the wrapped module if ``module`` is :py:class:`torch.nn.DataParallel`,
    :py:class:`~torch.nn.parallel.DistributedDataParallel` (``'module'``) or what :py:func:`torch.compile` returns
    (``'_orig_mod'``), else None.'''
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return 'module'
    if type(module).__name__ == 'OptimizedModule' and isinstance(getattr(module, '_orig_mod', None), torch.nn.Module):
        return '_orig_mod'
    return None


def check_composite(composite, caller):
    '''Raise a TypeError unless ``composite`` is a :py:class:`zennit.core.Composite`.'''
    if not isinstance(composite, Composite):
        raise TypeError(
            f'{caller} expects a Zennit composite (a zennit.core.Composite, for example '
            f'zennit.composites.EpsilonPlusFlat()), not {type(composite).__name__}.')


def check_inputs(inputs):
    '''Raise unless ``inputs`` is a floating-point tensor, or a non-empty tuple of them, with one batch size.

    Parameters
    ----------
    inputs: object
        What the user passed as ``inputs`` to ``attribute()``.

    Raises
    ------
    TypeError
        If an input is not a tensor or not floating point (relevance is a derivative by the inputs).
    ValueError
        If there is no input, an input has no batch dim or was made under :py:func:`torch.inference_mode`, or the
        batch sizes differ.
    RuntimeError
        If called inside :py:func:`torch.inference_mode`.
    '''
    if torch.is_inference_mode_enabled():
        raise RuntimeError('attribute() was called inside torch.inference_mode(), where autograd records nothing; '
                           'relevance is computed by a backward pass. Call it outside the inference_mode block '
                           '(torch.no_grad() around it is fine).')
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    if not tensors:
        raise ValueError('inputs is an empty tuple; pass a tensor, or a tuple of tensors, with the batch on dim 0.')
    for index, tensor in enumerate(tensors):
        what = 'inputs' if not isinstance(inputs, tuple) else f'inputs[{index}]'
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'{what} must be a torch.Tensor (or inputs a tuple of tensors), not '
                            f'{type(tensor).__name__}; pass further non-tensor arguments as additional_forward_args.')
        if not tensor.is_floating_point():
            raise TypeError(f'{what} has dtype {tensor.dtype}; relevance is computed from the derivative by the '
                            'inputs, which needs floating-point inputs (for example inputs.float()).')
        if tensor.is_inference():
            raise ValueError(f'{what} was made under torch.inference_mode(), and autograd cannot record operations on '
                             f'it; pass a copy made outside inference_mode ({what}.clone()).')
        if tensor.ndim == 0:
            raise ValueError(f'{what} is a 0-dim tensor; inputs need the batch on dim 0 (for one example, '
                             'inputs[None]).')
    sizes = {len(tensor) for tensor in tensors}
    if len(sizes) > 1:
        raise ValueError(f'the inputs have different batch sizes {sorted(sizes)} on dim 0; they must agree.')


def is_index(value):
    '''Whether ``value`` is an integer index (a Python or NumPy int, not a bool).'''
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def target_indices(target, batch):
    '''The output indices ``target`` selects, one tuple per selection, as Captum reads ``target``.

    Raises
    ------
    TypeError, ValueError
        If ``target`` has a type or form Captum does not take.
    '''
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f'a target tensor must hold integer class indices, not {target.dtype}.')
        if target.ndim > 1 or (target.ndim == 1 and len(target) != batch):
            raise ValueError(f'a target tensor must be 0-dim or hold one index per example ({batch}), not of shape '
                             f'{tuple(target.shape)}.')
        return [(index,) for index in target.reshape(-1).tolist()]
    if is_index(target):
        return [(target,)]
    if isinstance(target, tuple) and target and all(is_index(index) for index in target):
        return [target]
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f'a target list needs one entry per example: it has {len(target)} for a batch of '
                             f'{batch}.')
        if all(is_index(index) for index in target):
            return [(index,) for index in target]
        if all(isinstance(index, tuple) and index and all(is_index(item) for item in index) for index in target):
            return target
    raise TypeError(
        f'target must be an int class index, a tuple of ints (one index per output dim), a list of either (one per '
        f'example) or an integer tensor, not {target!r}.')


def plain_target(target):
    '''``target`` with each NumPy integer (alone, in a tuple or in a list) made a Python int and an integer tensor of
    another dtype (uint8, int32, ...) made int64, which is what Captum takes; anything else unchanged
    (:py:func:`check_target` judges it).'''
    if is_index(target):
        return int(target)
    integral = isinstance(target, torch.Tensor) and not target.is_floating_point() and not target.is_complex() \
        and target.dtype is not torch.bool
    if integral and target.numel() == 1:
        return int(target.item())  # one index for every example, as Captum's _select_targets takes it
    if integral and target.dtype is not torch.int64:
        return target.long()
    if isinstance(target, (tuple, list)):
        return type(target)(plain_target(item) for item in target)
    return target


def check_target(target, output):
    '''Raise unless ``target`` selects entries that exist in ``output`` (Captum's forms of ``target``), counting
    indices from 0: a negative index, which Python would count from the end, is almost always a mistake.

    Parameters
    ----------
    target: None, int, tuple, list or :py:obj:`torch.Tensor`
        As in Captum's ``attribute()``.
    output: :py:obj:`torch.Tensor`
        The model's output, dim 0 the batch.

    Raises
    ------
    TypeError
        If ``target`` has a type Captum does not take.
    ValueError
        If an index is negative or too large (the message gives the valid range), a target has more or fewer indices
        than the output has dims after the batch, the number of per-example targets is not the batch size, or
        ``target`` is None where the model gives more than one value per example.
    '''
    shape = tuple(output.shape)
    if target is None:
        if output.ndim > 1 and math.prod(shape[1:]) != 1:
            raise ValueError(f'target is None, but the model output has shape {shape}, more than one value per '
                             f'example; pass the class to explain, for example target=0 (0 to {shape[1] - 1}).')
        return
    for index in target_indices(target, shape[0] if shape else 0):
        if len(index) > len(shape) - 1:
            raise ValueError(f'target {index if len(index) > 1 else index[0]!r} has {len(index)} indices, but the '
                             f'model output of shape {shape} has {len(shape) - 1} dim(s) after the batch.')
        if len(index) < len(shape) - 1:
            # Captum's own LRP fails here; summing the selected entries would explain a sum nobody asked for
            example = tuple(index) + (0,) * (len(shape) - 1 - len(index))
            raise ValueError(
                f'target {index if len(index) > 1 else index[0]!r} selects {math.prod(shape[1 + len(index):])} '
                f'values per example of the model output of shape {shape}; give one index per dim after the batch, '
                f'for example target={example!r}.')
        for dim, value in enumerate(index, start=1):
            if not 0 <= value < shape[dim]:
                raise ValueError(
                    f'target {value} is out of range for the model output of shape {shape}: valid indices for '
                    f'dim {dim} are 0 to {shape[dim] - 1}.')


class InputWrittenError(ValueError):
    '''A module given a rule wrote into its input in place during the forward pass (see
    :py:func:`~zennit_bnfuse.prepared.guard_input_writes`); the message names the module and the fix.'''


@contextmanager
def checked_forward(model, inputs, target):
    '''Check ``target`` against the output of every forward pass of ``model`` in this context, and turn a
    RuntimeError or ValueError raised inside the forward pass (a shape or dtype mismatch) into a ValueError that names
    the model and the inputs' shapes, with the original error as its cause (a fused layer's
    :py:class:`~zennit_bnfuse.layers.FoldedInputError` and an :py:class:`InputWrittenError` already say what to do,
    and pass unchanged).

    ``model`` must be one the caller owns: a forward pre-hook and a forward hook are registered on it for the
    duration of the context.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model whose forward passes to check.
    inputs: tuple[:py:obj:`torch.Tensor`, ...]
        The inputs, for the message.
    target: object
        The target, checked with :py:func:`check_target` against each output that is a tensor.

    Raises
    ------
    ValueError, TypeError
        See :py:func:`check_target`; ValueError for a RuntimeError or ValueError in the forward pass.
    '''
    running = []

    def pre_hook(module, args):
        running.append(True)

    def hook(module, args, output):
        running.pop()
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f'{type(model).__name__}.forward returns a {type(output).__name__}, not a tensor; LRP explains one '
                'output tensor: pass a model that returns the logits (for example a wrapper module whose forward '
                'picks them from the output).')
        check_target(target, output)

    handles = [model.register_forward_pre_hook(pre_hook), model.register_forward_hook(hook)]
    try:
        yield
    except (RuntimeError, ValueError) as error:
        if not running or isinstance(error, (torch.OutOfMemoryError, FoldedInputError, InputWrittenError)):
            raise
        shapes = ', '.join(f'{tuple(input.shape)} {input.dtype}' for input in inputs)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f'{type(model).__name__} could not compute its output for inputs of shape {shapes}: {message}. Pass '
            'inputs of the shape and dtype the model takes, with the batch on dim 0.') from error
    finally:
        for handle in handles:
            handle.remove()


def agreeing(agrees):
    '''``agrees()``, False where it is None or raises (see :py:func:`check_additional_arguments`).'''
    try:
        return agrees is not None and bool(agrees())
    except Exception:  # the model's own forward failing on the call is for the call itself to report
        return False


def check_additional_arguments(prepared, model, num_inputs, additional_forward_args, caller, agrees=None,
                               agrees_once=None):
    '''Raise where the traced forward of ``prepared`` (a GraphModule; other models run their own forward) cannot
    compute what ``model`` computes with ``additional_forward_args``: torch.fx traced the tensors among them as
    tensor-like proxies (the arguments that are not tensors as their values, see
    :py:mod:`zennit_bnfuse.specialization`), so a check of a tensor argument's type (``isinstance(mask,
    torch.Tensor)``) took the branch for something else.

    Parameters
    ----------
    prepared: :py:obj:`torch.nn.Module`
        The prepared copy of ``model``.
    model: :py:obj:`torch.nn.Module`
        The user's model, whose forward's parameters name the arguments.
    num_inputs: int
        How many inputs come first among the forward's arguments.
    additional_forward_args: object
        As in Captum's ``attribute()``: None, one argument, or a tuple of them; the forward's defaults fill in the
        arguments after them.
    caller: str
        The class, for the message.
    agrees: callable, optional
        ``agrees() -> bool``: whether ``prepared`` gives ``model``'s output on this call (see
        :py:meth:`~zennit_bnfuse.prepared.PreparedModel.computes_as_model`); where it does, the traced forward
        leaving a tensor argument unread is right (the call's other values leave it out), and so is an argument
        traced as a proxy although it is not a tensor (a dict, an object, a tuple holding a tensor). Without it, or
        where it raises, every such argument is refused.
    agrees_once: callable, optional
        As ``agrees``, asked where an argument is a tuple or list the trace took as a value (a
        :py:class:`~zennit_bnfuse.specialization.FixedTuple` or ``FixedList``, which a check of its exact type tells
        from a tuple or list): the branches it takes are those of the call signature, so the answer may be kept per
        prepared copy.

    Raises
    ------
    ValueError
        If a tensor is given (or is the default) for an argument the traced forward never reads, an argument that is
        not a tensor is traced as a proxy, or a tuple or list as a subclass, and the prepared copy does not give the
        model's output on this call; None for one it computes with (an argument traced as a proxy); or arguments for
        a ``*args`` that keyword-only parameters follow (the traced forward takes those by position).
    '''
    if not isinstance(prepared, torch.fx.GraphModule):
        return
    parameters = placeholder_parameters(model)
    variable = next((parameter for parameter in parameters if parameter.kind is parameter.VAR_POSITIONAL), None)
    keyword_only = [parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY]
    positional = sum(parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                     for parameter in parameters)
    if variable is not None and keyword_only and num_inputs + len(as_argument_tuple(additional_forward_args)) > (
            positional):
        raise ValueError(
            f'{caller}: the forward of {type(model).__name__} takes `*{variable.name}` and then keyword-only arguments '
            f'({", ".join(keyword_only)}); the forward torch.fx generates takes those by position, so the arguments '
            f'given for `*{variable.name}` would fill them instead. Wrap the model in a module whose forward names '
            'its arguments.')
    values = call_arguments(model, num_inputs, additional_forward_args)
    concrete = concrete_arguments(model, num_inputs, additional_forward_args)
    placeholders = [node for node in prepared.graph.nodes if node.op == 'placeholder']
    agreed = functools.cache(lambda: agreeing(agrees))  # asked at most once per call: it runs the model
    for parameter, node in list(zip(parameters, placeholders))[num_inputs:]:
        if parameter.name not in values:
            continue  # *args, **kwargs, or not given without a default: the forward raises for that itself
        value, name = values[parameter.name], parameter.name
        if isinstance(concrete.get(name), (FixedTuple, FixedList)) and not agreeing(agrees_once):
            kind = type(value).__name__
            raise ValueError(
                f'{caller}: the traced forward of {type(model).__name__} does not give the model\'s output for its '
                f'argument `{name}`={value!r}: torch.fx traced the {kind} as a value of a {kind} subclass, so a check '
                f'such as `type({name}) is {kind}` took another branch. Check `isinstance({name}, {kind})` '
                'instead.')
        if name not in concrete and not isinstance(value, torch.Tensor) and not agreed():
            raise ValueError(
                f'{caller}: torch.fx traced the argument `{name}` of {type(model).__name__} ({type(value).__name__}) '
                'as a tensor-like proxy (None, bools, numbers, strings, enum members, dtypes, devices and tuples and '
                'lists of these are traced as values), and the prepared copy does not give the model\'s output on this '
                f'call: the forward checks `{name}` in a way the proxy answers otherwise (its type, `is None`, the '
                'type of an item). Pass tensors and such values, or set it as an attribute of the model.')
        if isinstance(value, torch.Tensor) and not node.users and not agreed():
            raise ValueError(
                f'{caller}: the traced forward of {type(model).__name__} does not read its argument `{name}`, for '
                'which a tensor was given, and does not give the model\'s output on this call: torch.fx traces a '
                f'tensor argument as a tensor-like proxy, so a check such as `isinstance({name}, torch.Tensor)` took '
                'the branch that leaves it out, and the relevance would explain the model without it. Check '
                f'`{name} is not None` instead of its type, or set it as an attribute of the model before explaining '
                'it.')
        if value is None and node.users:
            raise ValueError(
                f'{caller}: the traced forward of {type(model).__name__} computes with its argument `{name}`, which is '
                'None (given, or its default): torch.fx traced it as a tensor-like proxy, so a check such as '
                f'`{name} is None` took the branch that uses it. Give it a value, or set it as an attribute of the '
                'model and leave it out of additional_forward_args.')
