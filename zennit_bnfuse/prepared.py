'''Cached LRP-ready copies of a user's model, one per call signature, rebuilt only when the model changes.'''
import functools
import weakref
from collections import OrderedDict

import torch
import torch.fx

from .checks import InputWrittenError, check_additional_arguments, refuse_global_hooks, refuse_zennit_hooks
from .graph import LRPTracer, writes_into_input
from .handling import bn_handling
from .pairs import tracing_copy
from .specialization import as_argument_tuple, as_concrete, concrete_arguments, signature_key
from .user_warnings import warn_user
from .verification import output_mismatch, output_tensors, seeded_output

# what every nn.Module keeps in its __dict__ (parameters, buffers, children, hook dicts, the training flag)
MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
SCALAR_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def model_fingerprint(model):
    '''A cheap value that changes whenever ``model``'s tensors, structure or modes change.

    Every in-place update (an optimizer step, ``load_state_dict``, a BatchNorm updating its running statistics)
    bumps a tensor's version counter; replacing a tensor or module changes its identity; ``.to()`` changes the data
    pointer, device or dtype; a module's settings (``eps``, ``padding``, ...) show in its ``extra_repr()``; adding or
    removing a hook changes the keys of the module's hook dicts (each handle has its own id), and so does assigning a
    ``forward`` to a module instance; any other attribute a ``forward`` may read (a flag, a scale, a tensor held as a
    plain attribute) is compared by value, or by identity and version for tensors and other objects. Writes through
    ``tensor.data`` are not tracked by PyTorch and are not seen.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`

    Returns
    -------
    tuple
        Hashable; equal fingerprints mean the model is unchanged.
    '''
    tensors = tuple(
        (name, id(tensor), tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device, tuple(tensor.shape))
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    )
    modules = tuple((name, id(module), module.training, module.extra_repr(), hook_keys(module),
                     vars(module).get('forward'), attribute_values(module)) for name, module in model.named_modules())
    return tensors, modules


def attribute_values(module):
    '''The attributes ``module`` holds besides what every :py:class:`torch.nn.Module` keeps, each as a hashable value
    that changes when the attribute changes: scalars and strings as themselves, tensors by identity, version, data
    pointer, dtype, device and shape, tuples, lists and dicts item by item, plain objects (a config) by identity and
    their attributes, any other object (a module, a class) by identity; four levels deep.'''
    return tuple((key, value_fingerprint(value)) for key, value in vars(module).items()
                 if key not in MODULE_INTERNALS and key != 'forward')


def value_fingerprint(value, depth=0):
    '''A hashable stand-in for ``value`` that changes when it does (see :py:func:`attribute_values`).'''
    if isinstance(value, SCALAR_TYPES):
        return value
    if isinstance(value, torch.Tensor):
        return ('tensor', id(value), value._version, value.data_ptr(), value.dtype, value.device, tuple(value.shape))
    if depth < 4 and isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(value_fingerprint(item, depth + 1) for item in value))
    if depth < 4 and isinstance(value, dict):
        return ('dict', tuple((value_fingerprint(key, depth + 1), value_fingerprint(item, depth + 1))
                              for key, item in value.items()))
    state = vars(value) if hasattr(value, '__dict__') and not isinstance(value, (torch.nn.Module, type)) else None
    if depth < 4 and state:  # a plain object (a config): what the forward reads from it may change in place
        return ('object', type(value).__qualname__, id(value), value_fingerprint(dict(state), depth + 1))
    return ('object', type(value).__qualname__, id(value))


def hook_keys(module):
    '''The handle ids of every hook registered on ``module`` itself (forward, backward, state_dict, ...), by hook
    dict: they change whenever a hook is added or removed.'''
    return tuple((key, tuple(value)) for key, value in vars(module).items()
                 if key.endswith('hooks') and isinstance(value, dict) and value)


class PreparedModel:
    '''The LRP-ready copies of ``model`` under a BatchNorm handling, one per call signature, each built on first use
    and reused until ``model`` changes (see :py:func:`model_fingerprint`).

    A call signature is what a call gives the forward besides tensors: the arguments after the inputs that are not
    tensors (None, bools, numbers, strings), given or left at their defaults, are traced as the values of the call
    (see :py:mod:`zennit_bnfuse.specialization`), so that ``if mask is not None`` and ``x * scale`` compute what the
    model computes for them. The ``MAX_SIGNATURES`` (4) copies used last are kept, each a copy of the model.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The user's model; never changed.
    handling: str or :py:class:`~zennit_bnfuse.handling.BatchNormHandling`
        ``'fused'``, ``'unfused'`` or ``'naive'``.
    residual: str
        ``'captum'``, ``'zennit'`` or ``'operands'``, see :py:func:`zennit_bnfuse.graph.lrp_graph`.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Forward arguments to check the folds on, see :py:func:`zennit_bnfuse.fuse`.
    caller: str, optional
        The class that uses the copy, for error messages.
    gives_rule: callable, optional
        ``gives_rule(name, module) -> bool``: whether the caller gives the user's module ``name`` a rule. Such a
        module is kept a module of the copy where the trace would go into its forward (one without children that is
        not torch's, see :py:meth:`ruled_leaves`), so that the rule applies.

    Raises
    ------
    ValueError
        Here and in :py:meth:`get`, if a Zennit composite is registered on ``model`` (see
        :py:func:`~zennit_bnfuse.checks.refuse_zennit_hooks`); in :py:meth:`get`, if ``gives_rule`` gives a rule to a
        module of :py:meth:`ruled_leaves` whose forward writes into its input in place.

    Warns
    -----
    UserWarning
        Once, in :py:meth:`get`, when a call needs a copy for a signature and more than :py:attr:`MAX_SIGNATURES`
        are in use since the model last changed: each call with a value the last ones did not bring (a number that
        changes on every call) traces, copies and folds the model again.

    Attributes
    ----------
    builds: int
        How many times a copy was built.
    report: FusionReport or None
        The fusion report of the copy :py:meth:`get` returned last (None unless the handling fuses).
    copies: dict[str, str]
        For each copy of a reused module in the copy :py:meth:`get` returned last, the name of the original.
    '''
    MAX_SIGNATURES = 4

    def __init__(self, model, handling='fused', residual='captum', example_inputs=None, caller='PreparedModel',
                 gives_rule=None):
        refuse_zennit_hooks(model, caller)
        self.model = model
        self.caller = caller
        self.gives_rule = gives_rule
        self._tracer = LRPTracer()
        self.handling = bn_handling(handling)
        self.residual = residual
        self.example_inputs = example_inputs
        self.builds = 0
        self.report = None
        self.copies = {}
        self._built = OrderedDict()  # signature key -> (prepared, copies, report), the one used last at the end
        self._fingerprint = None
        self._warned_signatures = False
        self._agreed = weakref.WeakKeyDictionary()  # prepared copy -> whether it gave the model's output, asked once

    def get(self, num_inputs=1, additional_forward_args=None):
        '''The prepared model for a call with ``num_inputs`` inputs and ``additional_forward_args`` (as in Captum's
        ``attribute()``), built if the user's model changed since the last call or no copy for the call's signature
        is kept.'''
        refuse_global_hooks(self.caller)
        fingerprint = model_fingerprint(self.model)
        if fingerprint != self._fingerprint:
            self._built.clear()
        concrete_args = concrete_arguments(self.model, num_inputs, additional_forward_args)
        leaves = self.ruled_leaves()
        key = signature_key(concrete_args), leaves
        if key not in self._built:
            # registering a composite adds hooks, which changes the fingerprint: checked where the copy is made
            refuse_zennit_hooks(self.model, self.caller)
            unchecked = self.refuse_leaves_writing_into_their_input(leaves)
            built = self.handling.prepare(
                self.model, self.residual, self.example_inputs, concrete_args=concrete_args, leaves=leaves)
            for name in unchecked:
                guard_input_writes(built[0].get_submodule(name), name, self.caller)
            self._built[key] = built
            self._fingerprint = fingerprint
            self.builds += 1
            while len(self._built) > self.MAX_SIGNATURES:
                self._built.popitem(last=False)
                self.warn_signatures(concrete_args)
        self._built.move_to_end(key)
        prepared, self.copies, self.report = self._built[key]
        return prepared

    def ruled_leaves(self):
        '''The names of the model's modules without children that the LRP graph's trace would go into (modules that
        are not torch's, such as timm's activations or a user's own layer) and that ``gives_rule`` gives a rule:
        traced into, their forward's ops would run in the copy but the module would not, and the rule never apply.'''
        if self.gives_rule is None:
            return frozenset()
        return frozenset(name for name, module in self.model.named_modules() if not list(module.children())
                         and not self._tracer.is_leaf_module(module, name) and self.gives_rule(name, module))

    def refuse_leaves_writing_into_their_input(self, leaves):
        '''Raise if the forward of a module in ``leaves`` (see :py:meth:`ruled_leaves`) writes into its input in place,
        traced on a copy of it; return the names of those whose forward cannot be traced on its own (the copy checks
        them on every call, see :py:func:`guard_input_writes`).'''
        unchecked = []
        for name in sorted(leaves):
            module = self.model.get_submodule(name)
            with tracing_copy(module) as traced:  # the trace runs the forward's Python: it must not change the model
                traced_alone, writing = writes_into_input(traced)
            if not traced_alone:
                unchecked.append(name)
            elif writing is not None:
                raise ValueError(refusal(self.caller, name, module, f'its forward writes into its input in place '
                                                                    f'({writing})'))
        return unchecked

    def warn_signatures(self, concrete_args):
        '''Warn (once) that the copy for the oldest signature was dropped to build one for ``concrete_args``.'''
        if self._warned_signatures:
            return
        self._warned_signatures = True
        values = ', '.join(f'{name}={value!r}' for name, value in concrete_args.items() if as_concrete(value)[1])
        warn_user(
            f'zennit_bnfuse: {self.caller} traced the forward of {type(self.model).__name__} for more than '
            f'{self.MAX_SIGNATURES} values of its arguments that are not tensors (this call: {values}), and keeps '
            f'the copies for the last {self.MAX_SIGNATURES}: each call with another value traces, copies and folds '
            'the model again. Pass a value that changes from call to call (a temperature, a step) as a tensor, '
            'which the trace reads as an input.')

    def check_arguments(self, prepared, inputs, additional_forward_args):
        ''':py:func:`~zennit_bnfuse.checks.check_additional_arguments` for a call of ``prepared`` (a copy
        :py:meth:`get` returned) with ``inputs`` and ``additional_forward_args``, answering with
        :py:meth:`computes_as_model`, once per copy where the answer holds for the call signature.

        Raises
        ------
        ValueError
            See :py:func:`~zennit_bnfuse.checks.check_additional_arguments`.
        '''
        def agrees_once():
            # also on random inputs of the same shape: on a blank image or an empty batch two branches may agree
            if prepared in self._agreed:
                return self._agreed[prepared]
            generator = torch.Generator().manual_seed(0)
            drawn = tuple(torch.rand(input.shape, generator=generator, dtype=input.dtype).to(input.device)
                          for input in inputs)
            agrees = all(self.computes_as_model(prepared, each, additional_forward_args) for each in (inputs, drawn))
            if all(len(input) for input in inputs):  # an empty batch proves nothing
                self._agreed[prepared] = agrees
            return agrees
        check_additional_arguments(
            prepared, self.model, len(inputs), additional_forward_args, self.caller,
            functools.partial(self.computes_as_model, prepared, inputs, additional_forward_args), agrees_once)

    def computes_as_model(self, prepared, inputs, additional_forward_args):
        '''Whether ``prepared`` (a copy :py:meth:`get` returned for this call) gives the model's output on ``inputs``
        and ``additional_forward_args``: both run as :py:func:`~zennit_bnfuse.verification.seeded_output` runs them
        (alike for random numbers and inputs changed in place), the model as a copy that shares its parameters
        (:py:func:`~zennit_bnfuse.pairs.tracing_copy`: its forward may change its attributes or buffers in place),
        give an output holding tensors, and agree tensor by tensor (see
        :py:func:`~zennit_bnfuse.verification.output_mismatch`). Used where the trace may have taken another branch
        than the model: a tensor argument it leaves unread, an argument that is not a tensor traced as a proxy, a
        tuple or list traced as a subclass (see :py:meth:`check_arguments`).

        Parameters
        ----------
        prepared: :py:obj:`torch.nn.Module`
        inputs: tuple[:py:obj:`torch.Tensor`, ...]
        additional_forward_args: object
            As in Captum's ``attribute()``.

        Returns
        -------
        bool
        '''
        arguments = (*inputs, *as_argument_tuple(additional_forward_args))
        with tracing_copy(self.model) as model:  # no copy of the parameters on every such call
            expected = seeded_output(model, arguments)
        actual = seeded_output(prepared, arguments)
        return bool(output_tensors(expected)) and output_mismatch(actual, expected) is None

    def original_name(self, name):
        '''The user's name for a module of the prepared model (copies of reused modules map to the original).'''
        return self.copies.get(name, name)


def refusal(caller, name, module, what):
    '''The message refusing a rule for the module ``name`` that writes into its input (``what`` says how).'''
    return (f'{caller}: module `{name}` ({type(module).__name__}) has a rule and {what}: LRP rules need the input it '
            'writes over. Give it no rule, or make its forward out of place (inplace=False where it has that option).')


def guard_input_writes(module, name, caller):
    '''Make ``module`` (of a prepared copy) raise an :py:class:`~zennit_bnfuse.checks.InputWrittenError` whenever its
    forward writes into a tensor it is given:
    hooks record the version counters of its tensor arguments before the forward (those the last forward pre-hook
    hands it, or tensors they replaced: a detached alias shares the counter) and compare after it.'''
    versions = []

    def before(module, args, kwargs):
        versions[:] = [(tensor, tensor._version) for tensor in tensors_in((args, kwargs))]

    def after(module, args, kwargs, output):
        seen = {id(tensor) for tensor, _ in versions}
        written = (any(tensor._version != version for tensor, version in versions)
                   or any(id(tensor) not in seen and tensor._version for tensor in tensors_in((args, kwargs))))
        versions.clear()
        if written:
            raise InputWrittenError(refusal(caller, name, module, 'its forward wrote into its input in place (it '
                                                                  'could not be traced on its own to tell before)'))

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)


def tensors_in(value):
    '''The tensors in nested tuples, lists and dict values of ``value``.'''
    found = []
    torch.fx.node.map_aggregate(value, lambda item: found.append(item) if isinstance(item, torch.Tensor) else None)
    return found
