'''A Zennit composite kept registered on one model from call to call, its hooks active only during a call.

Registering a composite walks every module, asks the composite for each one's rule, copies it and registers its
forward hooks; removing it undoes all that. On densenet121 (376 modules) that is about 15 ms per call on a CPU, 5% of
a batch-1 LRP call, and the hook objects it creates and drops keep Python's garbage collector busy. A model that only
the caller uses (:py:class:`~zennit_bnfuse.CompositeLRP`'s prepared copy) can keep the hooks instead.
'''
import weakref
from contextlib import contextmanager


class KeptRegistration:
    '''``composite`` registered on the model of the last :py:meth:`call`, and kept there, inactive, between calls.

    Inside :py:meth:`call` the hooks compute the composite's rules; outside it they leave gradients alone (Zennit's
    ``active`` flag, as in :py:meth:`zennit.core.Composite.inactive`), and each hook has forgotten what the last call
    left in it (Zennit's ``Hook.remove``, which clears a hook's stored tensors and tensor hooks, not its module hooks).
    The composite's canonizers stay applied between calls.

    The composite's rules are read when it registers: at the first call, and again for a call on another model.
    Changing the composite (or its rule objects) afterwards has no effect until :py:meth:`remove`.

    Parameters
    ----------
    composite: :py:class:`zennit.core.Composite`
        The composite; this object registers and removes it, so it must not be registered elsewhere.
    '''
    def __init__(self, composite):
        self.composite = composite
        self.model_ref = None

    @property
    def model(self):
        '''The model the composite is registered on, or None.'''
        return None if self.model_ref is None else self.model_ref()

    def set_active(self, value):
        '''Switch every hook of the composite on or off.'''
        for hook in self.composite.hook_refs:
            hook.active = value

    @contextmanager
    def call(self, model):
        '''Register the composite on ``model`` unless it is there already, and switch its hooks on for the context.

        Yields
        ------
        :py:obj:`torch.nn.Module`
            ``model``.
        '''
        if self.model is not model or not self.composite.handles:  # handles: registered by someone else meanwhile
            self.remove()
            self.composite.register(model)
            self.model_ref = weakref.ref(model)
        self.set_active(True)
        try:
            yield model
        finally:
            for hook in self.composite.hook_refs:
                hook.active = False
                hook.remove()  # the call's state only: the module hooks stay (the composite holds their handles)

    def remove(self):
        '''Remove the hooks and revert the canonizers.'''
        self.composite.remove()
        self.model_ref = None
