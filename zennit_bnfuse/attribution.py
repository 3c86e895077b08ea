'''Captum-style attribution classes that run LRP on an LRP-ready copy of the model (BatchNorm fused by default).

- :py:class:`FusedLRP` runs Captum's own LRP rules.
- :py:class:`CompositeLRP` runs a Zennit composite behind Captum's ``attribute()`` signature.
'''
import copy
import difflib
import functools
import math
import weakref
from collections import defaultdict

import torch
import torch.fx
from captum._utils.common import (
    _format_output, _format_tensor_into_tuples, _is_tuple, _register_backward_hook, _run_forward,
)
from captum._utils.gradient import apply_gradient_requirements, undo_gradient_requirements
from captum.attr import LRP
from captum.log import log_usage
from captum.attr._utils.attribution import GradientAttribution
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule, PropagationRule
from zennit.canonizers import CompositeCanonizer, MergeBatchNorm
from zennit.composites import LayerMapComposite, MixedComposite
from zennit.core import Hook
from zennit.rules import Epsilon, Pass
from zennit.types import Activation

from .canonizers import FuseBatchNorm
from .captum_singlepass import CaptumSinglePass, called_layers
from .checks import check_composite, check_inputs, check_model, checked_forward, plain_target
from .fold import BATCH_NORM_TYPES, is_batch_norm, timm_layers
from .layers import ThresholdReLU, is_layer_like
from .graph import blocks_kept_whole, rewritable_in_place
from .graph_layers import SumReduction, is_norm_act
from .prepared import PreparedModel
from .pairs import other_norm_types
from .registration import KeptRegistration, modules_without_rule
from .singlepass import SinglePass
from .user_warnings import warn_user

# leaves that get Captum's EpsilonRule by default: every affine map (reductions: zennit_bnfuse.graph_layers)
EPSILON_RULE_TYPES = (
    torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._AvgPoolNd,
    torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveAvgPoolNd,
    torch.nn.modules.pooling._AdaptiveMaxPoolNd, Addition_Module, SumReduction, torch.nn.Upsample,
)
# leaves whose gradient maps relevance as LRP-epsilon does: reshapes, and paddings, whose outputs are copies of input
# entries (weight 1: each copy's relevance goes back whole) or constants (a bias: their relevance stays there)
PADDING_TYPES = tuple(getattr(torch.nn.modules.padding, f'_{kind}PadNd')
                      for kind in ('Constant', 'Reflection', 'Replication', 'Circular'))
AUTOGRAD_TYPES = (torch.nn.Flatten, torch.nn.Unflatten, *PADDING_TYPES)
# leaves relevance passes unchanged: elementwise activations, dropout, identity, and those above
PASS_THROUGH_TYPES = (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd, *AUTOGRAD_TYPES)


def is_pass_through(module):
    '''Whether LRP passes relevance through ``module`` unchanged by default (or by its gradient, for
    :py:data:`AUTOGRAD_TYPES`): activations (Zennit's ``Activation`` types, and timm's own activation modules), dropout,
    identity, reshapes and paddings.'''
    if isinstance(module, torch.nn.MultiheadAttention):
        return False
    extension = timm_layers()
    activations = () if extension is None else extension.ACTIVATION_TYPES
    return isinstance(module, (Activation, *activations, *PASS_THROUGH_TYPES))


def convergence_delta(attributions, output):
    '''LRP's completeness gap per example: ``output - sum(attributions)``.

    Parameters
    ----------
    attributions: :py:obj:`torch.Tensor` or tuple[:py:obj:`torch.Tensor`, ...]
        Relevance of the inputs, dim 0 is the batch.
    output: :py:obj:`torch.Tensor`
        The explained output value per example, shape ``(N,)`` or ``(N, 1)``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(N,)``.
    '''
    attributions = _format_tensor_into_tuples(attributions)
    # per-example sums, also for an empty batch (where Captum's _sum_rows cannot reshape)
    sums = (attribution.reshape(len(attribution), math.prod(attribution.shape[1:])).sum(dim=1)
            for attribution in attributions)
    return output.flatten() - sum(sums).flatten()


def check_engine(engine, engines):
    '''``engine`` if it is one of ``engines``, else a ValueError naming them.'''
    if engine not in engines:
        raise ValueError(f'engine must be one of {", ".join(map(repr, engines))}, not {engine!r}')
    return engine


def check_rule_names(model, rules):
    '''Raise unless every name among the keys of ``rules`` names a module of ``model``: a rule under a misspelt name
    would never apply, and the layer would get its default rule without a word.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
    rules: dict
        Rules by module name (str) or type.

    Raises
    ------
    ValueError
        If a name is not that of a module of ``model`` (the message suggests the closest names), or is that of a
        module that holds others (other than a layer: a BatchNorm or other normalisation, timm's norm-act layers, a
        conv or linear layer).
    '''
    names = dict(model.named_modules())
    for key in rules:
        if isinstance(key, str) and key not in names:
            close = difflib.get_close_matches(key, [name for name in names if name], n=3)
            hint = f'; did you mean {" or ".join(map(repr, close))}?' if close else (
                '; see dict(model.named_modules()) for the names.')
            raise ValueError(f'rules names {key!r}, which is not a module of the model{hint}')
        module = names.get(key) if isinstance(key, str) else None
        if module is not None and list(module.children()) and not (
                is_batch_norm(module) or is_norm_act(module) or is_layer_like(module)
                or isinstance(module, other_norm_types())):
            raise ValueError(
                f'rules names {key!r} ({type(module).__name__}), a module that holds others: Captum\'s rules go on '
                'the layers, so it would never apply. Name its layers, or give the rule for their type.')


def composite_gives_rule(composite, name, module):
    '''Whether Zennit's ``composite`` maps the module ``name`` to a rule (asked with a context of its own, as a
    registration on this module alone would ask).'''
    return composite.module_map({}, name, module) is not None


@functools.lru_cache(maxsize=None)
def rounds_to_zero(value, dtype):
    '''Whether the float ``value`` is 0 once stored in ``dtype`` (cached: checked once per value and dtype, not per
    rule and call).'''
    return torch.tensor(value, dtype=dtype).item() == 0


def check_stabilizers(rules, dtype):
    '''Raise unless the stabiliser of every Captum rule in ``rules`` is above 0 in ``dtype``.

    Captum's rules divide the relevance by ``z + sign(z) * epsilon`` (``epsilon = 1e-9`` unless set), and ``1e-9`` is
    0 in float16: every layer output that is exactly 0 (common after a ReLU) gives ``0 / 0``, and the NaN spreads to
    the whole input relevance (all of it on a float16 ResNet-18).

    Parameters
    ----------
    rules: dict[str, object]
        The rule (or None) of each layer, by name.
    dtype: :py:obj:`torch.dtype`
        The dtype the layers compute in.

    Raises
    ------
    ValueError
        Naming the first layer whose rule's epsilon is 0 in ``dtype``, and the fix.
    '''
    for name, rule in rules.items():
        epsilon = getattr(rule, 'STABILITY_FACTOR', None)
        if isinstance(epsilon, float) and epsilon > 0 and rounds_to_zero(epsilon, dtype):
            raise ValueError(
                f'the {type(rule).__name__} of `{name}` divides by z + sign(z) * {epsilon:g}, and {epsilon:g} is 0 '
                f'in {dtype}, so every output that is 0 would make the relevance NaN. Compute in float32 or '
                'bfloat16 (model.float() and inputs.float()), or give every layer a rule with an epsilon that '
                f'{dtype} holds (at least {torch.finfo(dtype).tiny:g}, e.g. rules={{torch.nn.Conv2d: '
                'EpsilonRule(epsilon=1e-4), ...}}).')


def batch_norm_canonizers(canonizers):
    '''The names of the canonizers among ``canonizers`` (Zennit's ``CompositeCanonizer`` opened) that fold
    BatchNorms into layers: :py:class:`~zennit_bnfuse.FuseBatchNorm` and Zennit's ``MergeBatchNorm`` family.'''
    names = []
    for canonizer in canonizers or ():
        if isinstance(canonizer, CompositeCanonizer):
            names += batch_norm_canonizers(canonizer.canonizers)
        elif isinstance(canonizer, (FuseBatchNorm, MergeBatchNorm)):
            names.append(type(canonizer).__name__)
    return names


def empty_batch_attribution(model, inputs, target, additional_forward_args):
    '''What LRP gives for an empty batch: zero relevance of each input's shape and an empty output, after a forward
    pass that checks the inputs' shapes and ``target`` (see :py:func:`zennit_bnfuse.checks.checked_forward`).

    Returns
    -------
    tuple[tuple[:py:obj:`torch.Tensor`, ...], :py:obj:`torch.Tensor`]
        The relevance per input and the explained output of shape ``(0,)``.
    '''
    # detached: Zennit's forward hooks (CompositeLRP keeps them on its copy between calls) fail on an input that
    # requires a gradient under no_grad
    inputs = tuple(input.detach() for input in inputs)
    with torch.no_grad(), checked_forward(model, inputs, target):
        output = _run_forward(model, inputs, None, additional_forward_args)
    return tuple(torch.zeros_like(input) for input in inputs), output.new_zeros(0)


class _RuleLRP(LRP):
    '''Captum's LRP with rules chosen by a function of the module's name, and pass-through for any module whose
    rule is None (Captum only allows ReLU, Dropout and Tanh there; reshapes are left to autograd).'''
    def __init__(self, model, choose_rule):
        self.choose_rule = choose_rule
        super().__init__(model)

    def _get_layers(self, model):
        # for a GraphModule, the modules the forward calls (it also holds parameter-only placeholders of inlined
        # modules)
        self.named_layers = called_layers(model)
        self.layers = [module for _, module in self.named_layers]

    def _check_and_attach_rules(self):
        for name, layer in self.named_layers:
            layer.rule = self.choose_rule(name, layer)
            if layer.rule is not None:
                layer.activations = {}
                layer.rule.relevance_input = defaultdict(list)
                layer.rule.relevance_output = {}

    def _register_forward_hooks(self):
        for name, layer in self.named_layers:
            if isinstance(layer, AUTOGRAD_TYPES) and layer.rule is None:
                continue  # plain autograd reshapes (or pads) the relevance
            if layer.rule is None:
                self.backward_handles.extend(_register_backward_hook(layer, self.pass_through_hook(name), self))
            else:
                self.forward_handles.append(layer.register_forward_hook(layer.rule.forward_hook))
                self.forward_handles.append(layer.register_forward_hook(self.gradient_in_output_layout))
                if self.verbose:
                    print(f'Applied {layer.rule} on layer {layer}')

    @staticmethod
    def gradient_in_output_layout(module, inputs, output):
        '''Make the gradient reaching the rule's output hook (and the layer's backward) contiguous where the output
        is: the rule's hook keeps the gradient's strides, and torch's CPU BatchNorm backward returns a wrong input
        gradient for some (see :py:func:`~zennit_bnfuse.singlepass.in_output_layout`). Runs after the rule's forward
        hook, on the copy of the output that the rule's hook returns.'''
        if isinstance(output, torch.Tensor) and output.requires_grad and output.is_contiguous():
            output.register_hook(torch.Tensor.contiguous)

    @staticmethod
    def pass_through_hook(name):
        """Captum's activation hook, refusing modules that change the shape (relevance cannot pass those)."""
        def hook(module, grad_input, grad_output):
            inner, outer = _format_tensor_into_tuples(grad_input), _format_tensor_into_tuples(grad_output)
            if any(first is not None and second is not None and first.shape != second.shape
                   for first, second in zip(inner, outer)):
                raise TypeError(
                    f'Module `{name}` ({type(module).__name__}) changes the shape of its input, so relevance cannot '
                    'pass through it unchanged; give it a rule instead of None.')
            return PropagationRule.backward_hook_activation(module, grad_input, grad_output)
        return hook


class FusedLRP(LRP):
    '''Captum's LRP, run on a copy of ``model`` whose BatchNorms are fused into their neighbouring layers.

    The copy is also rewritten so that LRP counts relevance right on ordinary models: residual ``a + b`` in
    ``forward`` becomes Captum's ``Addition_Module`` (EpsilonRule), and a module used twice (torchvision's BasicBlock
    reuses ``relu``) gets one copy per use. The copy is built on the first call and reused until the model's
    parameters, buffers or structure change. ``model`` itself is never changed.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model, in eval mode.
    rules: dict, optional
        Maps a module name (the user's own names; copies of a reused module share its name) or a module type to a
        Captum rule instance (or None: pass relevance through). Names win over a ``rule`` attribute set on the
        module (Captum's way), which wins over types, which win over the defaults: EpsilonRule for Linear, Conv,
        ConvTranspose, pooling, additions, BatchNorms that could not be fused and the
        :py:class:`~zennit_bnfuse.ThresholdReLU` modules that BN -> ReLU folds leave; pass-through for activations,
        dropout, identity and flatten.
    handling: str, optional
        ``'fused'`` (default), ``'unfused'`` (BatchNorm as an affine layer under EpsilonRule, Captum's default),
        ``'naive'`` (relevance passes BatchNorm) or ``'zennit'`` (Zennit's ``SequentialMergeBatchNorm``, the rest
        passed); see :py:func:`zennit_bnfuse.bn_handling`.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Forward arguments to check the folds on (see :py:func:`zennit_bnfuse.fuse`); needed to fold anything where
        the forward cannot be traced with torch.fx.
    engine: str, optional
        ``'singlepass'`` (default): Captum's rules computed from one forward pass
        (:py:class:`~zennit_bnfuse.captum_singlepass.CaptumSinglePass`), the same relevance; where one pass cannot
        reproduce Captum's two (see there), the call runs on Captum's hooks and :py:attr:`fallbacks` says why.
        ``'captum'``: Captum's own hooks (for comparison).

    Attributes
    ----------
    fallbacks: list[:py:class:`~zennit_bnfuse.singlepass.Fallback`]
        After a call with the single-pass engine: why the call ran on Captum's hooks (one entry), or the layers
        whose rule is not one of Captum's, whose own Captum methods ran in the single pass.

    Raises
    ------
    TypeError
        If ``model`` is not a torch.nn.Module or holds a TorchScript module, or a rule is not a Captum rule.
    ValueError
        If ``handling`` or ``engine`` is unknown, or ``rules`` names a module the model does not have.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> images = torch.rand(2, 3, 8, 8)
    >>> from zennit_bnfuse import FusedLRP
    >>> lrp = FusedLRP(model)
    >>> relevance, delta = lrp.attribute(images, target=3, return_convergence_delta=True)
    >>> relevance.shape, delta.shape
    (torch.Size([2, 3, 8, 8]), torch.Size([2]))
    >>> [entry.layer for entry in lrp.prepared.report.fused]
    ['0']
    '''
    def __init__(self, model, rules=None, handling='fused', example_inputs=None, engine='singlepass'):
        check_model(model, 'FusedLRP')
        super().__init__(model)
        self.engine = check_engine(engine, ('singlepass', 'captum'))
        self.fallbacks = []
        self.rules = dict(rules or {})
        for key, rule in self.rules.items():
            if not isinstance(key, (str, type)):
                raise TypeError(f'rules keys must be module names or module types, not {key!r}')
            if rule is not None and not isinstance(rule, PropagationRule):
                raise TypeError(
                    f'the rule for {key!r} must be a Captum PropagationRule instance (e.g. EpsilonRule()) or None, '
                    f'not {rule!r}')
        check_rule_names(model, self.rules)
        self.prepared = PreparedModel(model, handling, residual='captum', example_inputs=example_inputs,
                                      caller='FusedLRP', gives_rule=self.gives_rule)
        self.own_rules = {}
        self._checked = None  # the prepared copy whose modules were read last
        # the user's names of the modules the prepared copy holds that take a rule of their own
        self._present = set()
        self._whole_blocks = []  # the blocks timm marks untraceable that the prepared copy calls whole
        self._user_modules = {}  # the user's modules by name, read with the prepared copy

    def _prepared_model(self, num_inputs=1, additional_forward_args=None):
        '''The prepared copy for this call (see :py:meth:`PreparedModel.get`), and the ``rule`` attributes the user
        set on their modules now (Captum's way).'''
        prepared = self.prepared.get(num_inputs, additional_forward_args)
        report = self.prepared.report
        folded = {item.bn for item in (report.fused if report is not None else [])}
        if self._checked is not prepared:
            # the copy carries copies of the user's rule attributes; the user's modules are read on every call
            for module in prepared.modules():
                vars(module).pop('rule', None)
            # a folded BatchNorm's name holds its ThresholdReLU (the shift before a ReLU, which takes a rule) or
            # nothing of its own: an Identity, or timm's norm-act layer's drop and act in a container
            self._present = {self.prepared.original_name(name) for name, module in prepared.named_modules()
                             if name not in folded or isinstance(module, ThresholdReLU)}
            self._user_modules = dict(self.model.named_modules())
            self._whole_blocks = blocks_kept_whole(prepared) if isinstance(prepared, torch.fx.GraphModule) else []
            self.refuse_rules_for_folded([key for key in self.rules if key in folded], 'rules names')
            self._checked = prepared
        self.own_rules = {name: module.rule for name, module in self.model.named_modules()
                          if getattr(module, 'rule', None) is not None}
        # a rule may name a module this call does not run (an auxiliary head, a branch for other argument values;
        # set on every layer of a type, Captum's way): only a folded BatchNorm's is refused
        self.refuse_rules_for_folded([name for name in self.own_rules if name in folded],
                                     'a `rule` attribute is set on')
        return prepared

    def gives_rule(self, name, module):
        '''Whether the user gives their module ``name`` a rule: by name, by type, or as a ``rule`` attribute.'''
        return (name in self.rules or getattr(module, 'rule', None) is not None
                or any(isinstance(key, type) and isinstance(module, key) for key in self.rules))

    def refuse_rules_for_folded(self, names, given):
        '''Raise if a folded BatchNorm in ``names`` (given a rule; ``given`` says how, for the message) has no module
        of its own left in the prepared copy to take the rule, which would never apply.'''
        for key in names:
            if key not in self._present:
                folds = [item for item in self.prepared.report.fused if item.bn == key]
                into = f'is folded into {", ".join(f"`{layer}`" for layer in folds[0].layers)}'
                raise ValueError(
                    f'{given} {key!r}, which {into}: it has no layer of its own to take the rule, which would '
                    'never apply. Give the rule to the layer it was folded into, or pass handling=\'unfused\' to '
                    'keep the BatchNorm as a layer.')

    def choose_rule(self, name, module):
        '''The rule for the prepared model's module ``name``: a fresh Captum rule, or None to pass relevance.

        Raises
        ------
        TypeError
            If no rule is given for the module and its type has no default.
        ValueError
            If a rule is given for a module that runs in place inside a block the prepared copy keeps whole (one timm
            marks untraceable): the graph rewrite that gives such modules their own input cannot reach inside it.
        '''
        rule = self.rule_for(name, module)
        if rule is None or not getattr(module, 'inplace', False):
            return rule
        block = next((block for block in self._whole_blocks if name.startswith(f'{block}.')), None)
        if block is not None:
            where = (f'inside `{self.prepared.original_name(block)}`, a block timm marks untraceable, which the '
                     'prepared copy keeps whole')
        elif not isinstance(self._checked, torch.fx.GraphModule):
            where = 'in a forward torch.fx could not trace (see the warning), which the prepared copy keeps as it is'
        elif rewritable_in_place(module):  # the rewrite left it in place on purpose
            where = 'where the forward reads again the tensor it writes into (see the warning)'
        else:  # by its traced forward (PreparedModel checks those kept for their rule), not its flag
            return rule
        raise ValueError(
            f'FusedLRP: module `{self.prepared.original_name(name)}` ({type(module).__name__}) has a rule and runs in '
            f'place {where}: Captum\'s rules need the input it writes over. Give it no rule (None), or set '
            'inplace=False on it.')

    def rule_for(self, name, module):
        '''The rule for the prepared model's module ``name`` (see :py:meth:`choose_rule`).'''
        original = self.prepared.original_name(name)
        for rules in (self.rules, self.own_rules):
            if original in rules:
                return copy.deepcopy(rules[original])
        # the user's module too: the BatchNorm part of timm's norm-act layer is a plain BatchNorm in the copy
        users = self._user_modules.get(original)
        types = (module, users) if is_norm_act(users) else (module,)
        by_type = [key for key in self.rules if isinstance(key, type) and any(isinstance(each, key) for each in types)]
        if by_type:
            # the most specific type: fused layers are subclasses of the torch layer types users give
            mro = type(module).__mro__
            return copy.deepcopy(self.rules[min(by_type, key=lambda key: mro.index(key) if key in mro else len(mro))])
        if is_batch_norm(module) or isinstance(module, ThresholdReLU):
            # what remains of a BatchNorm: itself, or its shift before a ReLU (see ThresholdReLU)
            return EpsilonRule() if self.prepared.handling.batch_norm_rule == 'epsilon' else None
        if is_pass_through(module):
            return None
        if isinstance(module, EPSILON_RULE_TYPES):
            return EpsilonRule()
        kind = f'{type(module).__module__}.{type(module).__name__}'
        raise TypeError(
            f'Module `{original}` of type {kind} has no rule defined and no default rule exists for this module '
            f'type. Set a rule for it explicitly, for example FusedLRP(model, rules={{\'{original}\': EpsilonRule()}}) '
            f'or for its type, rules={{{kind}: EpsilonRule()}}, and make sure the rule fits the layer.'
        )

    @log_usage()
    def attribute(self, inputs, target=None, additional_forward_args=None, return_convergence_delta=False,
                  verbose=False):
        '''LRP relevance of ``inputs`` for ``target`` with Captum's semantics (:py:meth:`captum.attr.LRP.attribute`).

        Parameters
        ----------
        inputs: :py:obj:`torch.Tensor` or tuple[:py:obj:`torch.Tensor`, ...]
            Inputs, dim 0 the batch.
        target: int, tuple, :py:obj:`torch.Tensor` or list, optional
            Output indices to explain, as in Captum.
        additional_forward_args: object, optional
            Further forward arguments that are not attributed.
        return_convergence_delta: bool, optional
            Also return ``output - sum(relevance)`` per example.
        verbose: bool, optional
            Print which rule each layer gets.

        Returns
        -------
        :py:obj:`torch.Tensor` or tuple, and optionally the delta
            Relevance of the same shape(s) as ``inputs``; it sums to about the target output per example. For an
            empty batch, zeros of the inputs' shapes (and an empty delta).

        Raises
        ------
        TypeError
            If an input is not a floating-point tensor, ``target`` has a type Captum does not take, the forward
            returns something other than a tensor, a module has no rule (the message names the ``rules=`` entry to
            add), or the model cannot be deep-copied.
        ValueError
            If ``target`` selects no output entry (a negative or too large index: the message gives the valid range),
            the model cannot run on the inputs (the message names their shapes; the model's error is the cause), a
            rule's epsilon is 0 in the inputs' dtype (see :py:func:`check_stabilizers`), a BatchNorm or dropout is
            in training mode, a Zennit composite is registered on the model, a rule (``rules=`` or a ``rule``
            attribute) names a BatchNorm that is folded, or a tensor is given for an argument the traced forward
            never reads (see :py:func:`~zennit_bnfuse.checks.check_additional_arguments`).
        RuntimeError
            If called inside :py:func:`torch.inference_mode`, or global module hooks are registered.
        '''
        check_inputs(inputs)
        target = plain_target(target)
        input_tuple = _format_tensor_into_tuples(inputs)
        prepared = self._prepared_model(len(input_tuple), additional_forward_args)
        self.prepared.check_arguments(prepared, input_tuple, additional_forward_args)
        if len(input_tuple[0]) == 0:
            relevance, output = empty_batch_attribution(prepared, input_tuple, target, additional_forward_args)
            relevance = _format_output(_is_tuple(inputs), relevance)
            return (relevance, output) if return_convergence_delta else relevance
        self.fallbacks = []
        # what the layers compute in: the model's dtype (inputs of another dtype fail in the forward, which says so)
        dtype = next((tensor.dtype for tensor in prepared.parameters() if tensor.is_floating_point()),
                     input_tuple[0].dtype)
        if self.engine == 'singlepass':
            engine = CaptumSinglePass(prepared, self.choose_rule, autograd_types=AUTOGRAD_TYPES)
            check_stabilizers(engine.rules, dtype)
            self.fallbacks = engine.fallbacks
            if engine.fallback is None:
                # the engine's forward model (the prepared copy, or a copy of its graph without some clones)
                with checked_forward(engine.forward_model, input_tuple, target):
                    return self._attribute_single_pass(engine, inputs, target, additional_forward_args,
                                                       return_convergence_delta, verbose)
        else:
            check_stabilizers({name: self.choose_rule(name, module) for name, module in called_layers(prepared)},
                              dtype)
        with checked_forward(prepared, input_tuple, target):
            return _RuleLRP(prepared, self.choose_rule).attribute(
                inputs, target=target, additional_forward_args=additional_forward_args,
                return_convergence_delta=return_convergence_delta, verbose=verbose,
            )

    @staticmethod
    def _attribute_single_pass(engine, inputs, target, additional_forward_args, return_convergence_delta, verbose):
        ''':py:meth:`attribute` with the single-pass engine.'''
        is_tuple = _is_tuple(inputs)
        inputs = _format_tensor_into_tuples(inputs)
        gradient_mask = apply_gradient_requirements(inputs)
        try:
            relevance, output = engine.attribute(inputs, target, additional_forward_args, verbose)
        finally:
            undo_gradient_requirements(inputs, gradient_mask)
        if return_convergence_delta:
            return _format_output(is_tuple, relevance), convergence_delta(relevance, output)
        return _format_output(is_tuple, relevance)

    def compute_convergence_delta(self, attributions, output):
        '''``output - sum(attributions)`` per example (LRP's completeness gap).'''
        return convergence_delta(attributions, output)


class CompositeLRP(GradientAttribution):
    '''LRP from a Zennit composite, behind Captum's ``attribute()`` signature.

    The composite runs on a prepared copy of ``model``: BatchNorms fused first (as if
    :py:class:`~zennit_bnfuse.FuseBatchNorm` stood in front of the composite's canonizers), every residual ``a + b``
    in the traced forward turned into a ``Sum`` module (which Zennit's composites give the ``Norm`` rule) for any
    traceable model: :py:class:`~zennit_bnfuse.graph_layers.AddOperands` for the single-pass engine, Zennit's ``Sum``
    over the stacked operands for Zennit's hooks (the same relevance); and one module per use of a reused module.
    ``model`` is never changed.

    The composite registers on the prepared copy at the first call and stays there, its hooks inactive between calls
    (see :py:class:`~zennit_bnfuse.registration.KeptRegistration`), until the copy is built again because ``model``
    changed. Which rule each module gets is read when it registers; whether later changes to ``composite`` or its
    rule objects are seen is not specified: for other rules, make a new ``CompositeLRP``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model, in eval mode.
    composite: :py:obj:`zennit.core.Composite`
        For example ``EpsilonPlusFlat()``. Its canonizers run on the prepared copy.
    handling: str, optional
        ``'fused'`` (default), ``'unfused'`` (BatchNorm under Zennit's Epsilon rule), ``'naive'`` (``Pass``) or
        ``'zennit'`` (Zennit's ``SequentialMergeBatchNorm``, the rest ``Pass``); BatchNorms still in the model
        get the handling's rule ahead of the composite's own mapping.
    batch_norm_rule: :py:obj:`zennit.core.Hook`, optional
        The rule for BatchNorms still in the model, and for the :py:class:`~zennit_bnfuse.ThresholdReLU` modules
        that ``BN -> ReLU -> layer`` folds leave (the BatchNorm's shift before the ReLU), instead of the handling's
        (``Epsilon()`` for ``'fused'`` and ``'unfused'``, ``Pass()`` for ``'naive'``).
    single_pass: bool, optional
        Older spelling of ``engine``: True for ``'singlepass'``, False for ``'zennit'``.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        As in :py:class:`FusedLRP`.
    engine: str, optional
        ``'singlepass'`` (the default): the rules are computed by :py:class:`~zennit_bnfuse.singlepass.SinglePass`, the
        same relevance as Zennit's hooks, faster; modules it does not compute fall back to Zennit's hooks one by one
        (see :py:attr:`fallbacks`). ``'zennit'``: Zennit's own hooks everywhere (for comparison).

    Attributes
    ----------
    fallbacks: list[:py:class:`~zennit_bnfuse.singlepass.Fallback`]
        After a call with the single-pass engine, the modules (names in the prepared copy) whose rule Zennit's own
        hooks compute, with the reason, noted since the prepared copy was built (a module that falls back once stays
        with Zennit's hook); empty for ``engine='zennit'``.

    Raises
    ------
    TypeError
        If ``model`` is not a torch.nn.Module or holds a TorchScript module, ``composite`` is not a Zennit composite
        or ``batch_norm_rule`` not a Zennit rule.
    ValueError
        If ``handling`` or ``engine`` is unknown, ``single_pass`` contradicts ``engine``, or ``handling`` keeps
        BatchNorms that a canonizer of ``composite`` (``FuseBatchNorm``, Zennit's ``SequentialMergeBatchNorm``, ...)
        would fold.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> images = torch.rand(2, 3, 8, 8)
    >>> from zennit.composites import EpsilonPlusFlat
    >>> from zennit_bnfuse import CompositeLRP
    >>> lrp = CompositeLRP(model, EpsilonPlusFlat())
    >>> relevance = lrp.attribute(images, target=[3, 5])
    >>> relevance.shape, lrp.fallbacks
    (torch.Size([2, 3, 8, 8]), [])
    '''
    def __init__(self, model, composite, handling='fused', batch_norm_rule=None, single_pass=None,
                 example_inputs=None, engine=None):
        check_model(model, 'CompositeLRP')
        check_composite(composite, 'CompositeLRP')
        if batch_norm_rule is not None and not isinstance(batch_norm_rule, Hook):
            raise TypeError(f'batch_norm_rule must be a Zennit rule (a zennit.core.Hook, for example '
                            f'zennit.rules.Epsilon()) or None, not {type(batch_norm_rule).__name__}.')
        super().__init__(model)
        self.model = model
        if single_pass is not None:
            implied = 'singlepass' if single_pass else 'zennit'
            if engine is not None and engine != implied:
                raise ValueError(f'single_pass={single_pass} asks for engine={implied!r} but engine={engine!r} was '
                                 'given too; give only engine')
            engine = implied
        self.engine = check_engine('singlepass' if engine is None else engine, ('singlepass', 'zennit'))
        # Zennit's hooks take one input per module, so residual additions stack their operands for them; SinglePass
        # adds them as they are
        residual = 'operands' if self.engine == 'singlepass' else 'zennit'
        self.prepared = PreparedModel(model, handling, residual=residual, example_inputs=example_inputs,
                                      caller='CompositeLRP',
                                      gives_rule=functools.partial(composite_gives_rule, composite))
        merging = batch_norm_canonizers(composite.canonizers)
        if merging and not self.prepared.handling.fuses:
            raise ValueError(
                f"handling={self.prepared.handling.name!r} keeps the BatchNorms for its own rule, but the composite's "
                f"canonizer {merging[0]} folds them into the layers; remove it from the composite's canonizers, or "
                "use handling='fused' (which folds every BatchNorm it can before the composite's canonizers run)")
        if batch_norm_rule is None:
            batch_norm_rule = Epsilon() if self.prepared.handling.batch_norm_rule == 'epsilon' else Pass()
        # BatchNorms the handling keeps, and what BN -> ReLU folds leave of a BatchNorm (its shift before a ReLU, see
        # ThresholdReLU), get the handling's rule ahead of the composite's own mapping
        self.composite = MixedComposite([
            LayerMapComposite([(BATCH_NORM_TYPES, batch_norm_rule), (ThresholdReLU, batch_norm_rule)]), composite])
        if self.engine == 'singlepass':
            # the prepared copy is ours: nobody writes its parameters behind autograd's back
            self.composite = SinglePass(self.composite, cache=True)
        # the prepared copy is ours: the composite stays registered on it between calls
        self.registration = KeptRegistration(self.composite)
        self.checked_copy = None  # weak reference to the prepared copy whose rules were checked

    def warn_unruled_norms(self, prepared):
        '''Warn, once per prepared copy, about normalisation layers other than BatchNorms (GroupNorm, LayerNorm, ...,
        see :py:func:`~zennit_bnfuse.pairs.other_norm_types`) that the composite, registered on ``prepared``, gave no
        rule.'''
        if self.checked_copy is not None and self.checked_copy() is prepared:
            return
        self.checked_copy = weakref.ref(prepared)
        unruled = modules_without_rule(prepared, other_norm_types())
        if unruled:
            names = list(dict.fromkeys(map(self.prepared.original_name, unruled)))
            kind = type(prepared.get_submodule(unruled[0])).__name__
            warn_user(
                f'zennit_bnfuse: the composite gives no rule to {len(names)} normalisation layer(s) that are not '
                f'BatchNorms ({", ".join(f"`{name}`" for name in names[:5])}{", ..." if len(names) > 5 else ""}; '
                f'the first of type {kind}), so LRP passes relevance through them by their plain gradient, which is '
                'not a relevance: it carries the gradient of the statistics they normalise by. Give them a rule that '
                'fits the layer in the composite, by type (a LayerMapComposite in a MixedComposite ahead of yours) or '
                'by name (NameMapComposite).')

    @property
    def fallbacks(self):
        '''The modules whose rule Zennit's own hooks compute (see the class docstring).'''
        return list(getattr(self.composite, 'fallbacks', []))

    @property
    def multiplies_by_inputs(self):
        return True

    def has_convergence_delta(self):
        return True

    def compute_convergence_delta(self, attributions, output):
        '''``output - sum(attributions)`` per example (LRP's completeness gap).'''
        return convergence_delta(attributions, output)

    @log_usage()
    def attribute(self, inputs, target=None, additional_forward_args=None, return_convergence_delta=False):
        '''Relevance of ``inputs`` for ``target`` from the composite, scaled so it sums to about the target output.

        The parameters, return value and errors are those of :py:meth:`FusedLRP.attribute` (without ``verbose``).
        '''
        check_inputs(inputs)
        target = plain_target(target)
        is_tuple = _is_tuple(inputs)
        inputs = tuple(input.detach().requires_grad_(True) for input in _format_tensor_into_tuples(inputs))
        prepared = self.prepared.get(len(inputs), additional_forward_args)
        self.prepared.check_arguments(prepared, inputs, additional_forward_args)
        if len(inputs[0]) == 0:
            relevance, output = empty_batch_attribution(prepared, inputs, target, additional_forward_args)
        else:
            with checked_forward(prepared, inputs, target), self.registration.call(prepared, self.prepared.copies), \
                    torch.enable_grad():
                self.warn_unruled_norms(prepared)
                output = _run_forward(prepared, inputs, target, additional_forward_args)
                relevance = torch.autograd.grad(output, inputs, grad_outputs=output.detach())
        relevance = _format_output(is_tuple, relevance)
        if return_convergence_delta:
            return relevance, self.compute_convergence_delta(relevance, output.detach())
        return relevance
