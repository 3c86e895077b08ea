'''A Zennit composite kept registered on one model from call to call, its hooks active only during a call.

Registering a composite walks every module, asks the composite for each one's rule, copies it and registers its
forward hooks; removing it undoes all that, and the hook objects it creates and drops keep Python's garbage collector
busy. A model that only the caller uses (:py:class:`~zennit_bnfuse.CompositeLRP`'s prepared copy) can keep the hooks
instead: at batch 1 on a CPU, registering per call took 1.00-1.03x as long as keeping the registration
(``benchmarks/results/speed-interleaved.md``, the ``composite-registering`` rows).
'''
import weakref
from contextlib import contextmanager

from zennit.core import Hook


def module_hooks(module):
    '''The Zennit hooks whose forward hooks are registered on ``module`` itself.'''
    for function in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        owner = getattr(function, '__self__', None)
        if isinstance(owner, Hook):
            yield owner


def zennit_hooks(model):
    '''Every Zennit hook whose forward hooks are registered on a module of ``model``: the composite's, and those its
    canonizers register themselves (:py:class:`~zennit_bnfuse.FuseBatchNorm`'s ``threshold_rule``), each once.'''
    hooks = {id(hook): hook for module in model.modules() for hook in module_hooks(module)}
    return list(hooks.values())


def modules_without_rule(model, types):
    '''The names of the modules of ``model`` that are instances of ``types`` and have no Zennit hook registered on
    them (the composite gave them no rule), in ``named_modules`` order.'''
    return [name for name, module in model.named_modules()
            if isinstance(module, types) and next(module_hooks(module), None) is None]


def forget_call(hook):
    '''Drop what Zennit hook ``hook`` kept from the last call: its stored tensors and the hooks on that call's tensors
    (what Zennit's ``Hook.remove`` clears, without calling a ``remove`` that a rule may have overridden), or what its
    own ``forget_call`` method drops (:py:class:`~zennit_bnfuse.singlepass.SinglePassHook`).'''
    own = getattr(hook, 'forget_call', None)
    if own is not None:
        own()
        return
    hook.stored_tensors.clear()
    hook.tensor_handles.remove()


@contextmanager
def users_names(composite, names):
    '''Within the context, ``composite``'s ``module_map`` gets, for each module named in ``names``, the name mapped
    to there instead of the module's own.'''
    if not names:
        yield
        return
    missing = object()
    own = vars(composite).get('module_map', missing)
    module_map = composite.module_map

    def renamed(ctx, name, module):
        return module_map(ctx, names.get(name, name), module)

    composite.module_map = renamed
    try:
        yield
    finally:
        if own is missing:
            del composite.module_map
        else:
            composite.module_map = own


class KeptRegistration:
    '''``composite`` registered on the model of the last :py:meth:`call`, and kept there, inactive, between calls.

    Inside :py:meth:`call` the hooks compute the composite's rules. After it, every Zennit hook on the model (the
    composite's and those its canonizers registered) is switched off (Zennit's ``active`` flag, as in
    :py:meth:`zennit.core.Composite.inactive`: the gradient passes unchanged) and has dropped what the call left in it
    (:py:func:`forget_call`). Between calls the canonizers stay applied, and Zennit's forward hooks still run on any
    forward pass of the model (they copy the input, and a rule keeps it until the next call ends); a forward pass under
    ``torch.no_grad()`` of an input that requires a gradient fails in Zennit's hooks, as it does inside a call.

    The composite registers at the first call, for a call on another model, and where it was removed or registered
    elsewhere meanwhile; its rules are read then. The model must not change while the composite is registered
    (replaced modules keep no hooks); :py:meth:`remove` before changing it.

    Parameters
    ----------
    composite: :py:class:`zennit.core.Composite`
        The composite; this object registers and removes it.
    '''
    def __init__(self, composite):
        self.composite = composite
        self.model_ref = None
        self.token = None  # the composite's first handle when this object registered it
        self.hooks = []

    @property
    def model(self):
        '''The model the composite is registered on by this object, or None.'''
        return None if self.model_ref is None else self.model_ref()

    def registered_on(self, model):
        '''Whether the composite is still registered on ``model`` as this object registered it.'''
        handles = self.composite.handles
        return self.model is model and self.token is not None and bool(handles) and handles[0] is self.token

    def set_active(self, value):
        '''Switch every Zennit hook on the model on or off.'''
        for hook in self.hooks:
            hook.active = value

    @contextmanager
    def call(self, model, names=None):
        '''Register the composite on ``model`` unless it is there already, and switch its hooks on for the context.

        Parameters
        ----------
        model: :py:obj:`torch.nn.Module`
            The model to register on.
        names: dict[str, str], optional
            For modules of ``model`` whose name is not the user's (the copies of a reused module in a prepared
            model), the user's name: the composite's ``module_map`` sees that one, so that a rule chosen by name
            (Zennit's ``NameMapComposite``) reaches every use of the module.

        Yields
        ------
        :py:obj:`torch.nn.Module`
            ``model``.
        '''
        if not self.registered_on(model):
            self.remove()
            with users_names(self.composite, names or {}):
                self.composite.register(model)
            self.model_ref = weakref.ref(model)
            self.token = self.composite.handles[0] if self.composite.handles else None
            self.hooks = zennit_hooks(model)
        self.set_active(True)
        try:
            yield model
        finally:
            self.set_active(False)
            for hook in self.hooks:
                forget_call(hook)

    def remove(self):
        '''Remove the hooks and revert the canonizers.'''
        self.composite.remove()
        self.model_ref, self.token, self.hooks = None, None, []
