'''The Zennit canonizer that fuses BatchNorms for the duration of an attribution.'''
import itertools
import weakref

from zennit.canonizers import Canonizer
from zennit.core import Hook
from zennit.rules import Epsilon

from .checks import check_model, refuse_global_hooks
from .layers import BiasMapConvMixin, ThresholdReLU
from .pairs import find_fusable_pairs
from .prepared import model_fingerprint
from .replacements import replacement_modules, set_module


# the default of FuseBatchNorm's threshold_rule (None means: register no rule)
DEFAULT = object()


def tensor_state(module):
    '''``(dtype, device, training)`` of ``module``: its first floating-point parameter or buffer's (None, None
    without one) and its mode.'''
    tensor = next((tensor for tensor in itertools.chain(module.parameters(), module.buffers())
                   if tensor.is_floating_point()), None)
    return (None, None, module.training) if tensor is None else (tensor.dtype, tensor.device, module.training)


def replacements_fingerprint(replacements):
    '''The :py:func:`~zennit_bnfuse.prepared.model_fingerprint` of each replacement module, by name.'''
    return tuple((name, model_fingerprint(module)) for name, module in replacements.items())


class FuseBatchNorm(Canonizer):
    '''Canonizer that folds every BatchNorm it can into a neighbouring Linear/Conv/ConvTranspose layer.

    Pairs are found in the traced forward graph (see :py:func:`zennit_bnfuse.pairs.find_fusable_pairs`), so BNs
    before a layer, after functional ops, or in any container are found. While applied, the folded BatchNorms and
    their layers are replaced in their parent modules by fused modules; the user's modules, parameters and buffers
    are never written to, so removing the canonizer restores the model bit for bit.

    Use it like any Zennit canonizer, alone or with others:

    >>> import torch
    >>> from zennit.attribution import Gradient
    >>> from zennit.composites import EpsilonPlusFlat
    >>> from zennit_bnfuse import FuseBatchNorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> canonizer = FuseBatchNorm()
    >>> with Gradient(model, EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
    ...     output, relevance = attributor(torch.rand(1, 3, 8, 8), torch.eye(10)[[3]])
    >>> relevance.shape, len(canonizer.report.fused)
    (torch.Size([1, 3, 8, 8]), 1)
    >>> type(model[1]).__name__  # the model is back as it was
    'BatchNorm2d'

    The pairs and fused modules are found once per model and reused by later applications (a composite applies
    its canonizers on every ``context``) until the model's parameters, buffers or structure change.

    Parameters
    ----------
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Positional arguments of the model's forward to check the folds on (see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`); needed to fold anything where the forward cannot be
        traced with torch.fx.
    threshold_rule: :py:class:`zennit.core.Hook` or None, optional
        The rule registered on each :py:class:`~zennit_bnfuse.ThresholdReLU` this canonizer puts in place (what
        remains of ``BatchNorm -> ReLU`` folds: the BatchNorm's shift, a bias, before a ReLU); default
        ``zennit.rules.Epsilon()``, which gives the relevance an unfused BatchNorm under LRP-epsilon gets. Zennit's
        built-in composites map no rule to it (it is not an activation). Pass None where your composite maps
        ThresholdReLU itself.

    Attributes
    ----------
    report: :py:class:`~zennit_bnfuse.report.FusionReport` or None
        The report of the last :py:meth:`apply`.
    '''
    def __init__(self, example_inputs=None, threshold_rule=DEFAULT):
        super().__init__()
        if threshold_rule is DEFAULT:
            threshold_rule = Epsilon()
        if threshold_rule is not None and not isinstance(threshold_rule, Hook):
            raise TypeError(f'threshold_rule must be a Zennit rule (a zennit.core.Hook, e.g. zennit.rules.Epsilon()) '
                            f'or None, not {type(threshold_rule).__name__}')
        self.example_inputs = example_inputs
        self.threshold_rule = threshold_rule
        self.handles = []
        self.report = None
        self.root = None
        self.originals = {}
        self.built = {}  # name -> tensor_state of each replacement when put in place
        self._cache = weakref.WeakKeyDictionary()

    def apply(self, root_module):
        '''Fuse the BatchNorms of ``root_module`` in place, reversibly.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model, in eval mode.

        Returns
        -------
        list[:py:class:`FuseBatchNorm`]
            One applied instance, whose :py:meth:`remove` restores the model.

        Raises
        ------
        TypeError
            If ``root_module`` is not a torch.nn.Module, holds a TorchScript module or a wrapper (``DataParallel``,
            ``torch.compile``) or has a hook from the deprecated ``register_backward_hook`` (see
            :py:func:`~zennit_bnfuse.checks.check_model`).
        ValueError
            If a BatchNorm is in training mode or has invalid statistics, a lazy module has not run yet, or the model
            raises on the example inputs; the model is unchanged then.
        RuntimeError
            If global module hooks are registered.
        '''
        check_model(root_module, 'FuseBatchNorm')
        refuse_global_hooks('FuseBatchNorm')
        fingerprint = model_fingerprint(root_module)
        cached = self._cache.get(root_module)
        # the replacements are reused only as they were built: a change made to them inside an earlier context (an
        # in-place weight update, .double()) would otherwise reach the next one
        if cached is None or cached[0] != fingerprint or cached[3] != replacements_fingerprint(cached[2]):
            report = find_fusable_pairs(root_module, self.example_inputs)
            replacements = replacement_modules(root_module, report)
            cached = (fingerprint, report, replacements, replacements_fingerprint(replacements))
            self._cache[root_module] = cached
        _, self.report, replacements, _ = cached
        instance = self.copy()
        instance.report = self.report
        instance.register(root_module, replacements)
        return [instance]

    def register(self, root_module, replacements):
        '''Put ``replacements`` (module name -> module) in place in ``root_module``, remembering the originals, and
        register ``threshold_rule`` on the thresholded ReLUs among them.'''
        self.root = root_module
        modules = dict(root_module.named_modules())
        self.built = {name: tensor_state(module) for name, module in replacements.items()}
        try:
            for name, module in replacements.items():
                self.originals[name] = modules[name]
                set_module(root_module, name, module)
                # a folded timm norm-act layer holds its ThresholdReLU inside (see timm_layers.norm_act_remainder)
                for part in module.modules():
                    if isinstance(part, ThresholdReLU) and self.threshold_rule is not None:
                        self.handles.append(self.threshold_rule.copy().register(part))
        except BaseException:
            self.remove()
            raise

    def remove(self):
        '''Remove the rules it registered and put the original modules back, with what was done to the model inside
        the context (``model.double()``, ``.to(device)``, ``.train()``) done to them too: the replacements went
        through it in their place.'''
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.root is not None:
            self.follow_changes()
        for name, module in reversed(list(self.originals.items())):
            # a bias map is derived state (rebuilt on the next forward): dropped, the replacement is again as built
            # and the next context reuses it
            for part in self.root.get_submodule(name).modules():
                if isinstance(part, BiasMapConvMixin):
                    part.drop_bias_map()
            set_module(self.root, name, module)
        self.originals.clear()
        self.root = None

    def follow_changes(self):
        '''Convert each original module as its replacement was converted inside the context (its dtype, device and
        mode); a replacement without tensors (what a folded BatchNorm leaves) follows the layer it went into.'''
        partners = {} if self.report is None else {entry.bn: entry.layer for entry in self.report.fused}
        now = {name: tensor_state(self.root.get_submodule(name)) for name in self.originals}
        for name, original in self.originals.items():
            dtype, device, training = now[name]
            if dtype is None and partners.get(name) in now:
                dtype, device = now[partners[name]][:2]
                built = self.built[partners[name]][:2]
            else:
                built = self.built[name][:2]
            if dtype is not None and (dtype, device) != built:
                original.to(device=device, dtype=dtype)
            if training != self.built[name][2]:
                original.train(training)

    def copy(self):
        '''A new, unapplied instance with the same example inputs and threshold rule.'''
        return self.__class__(self.example_inputs, self.threshold_rule)
