'''Zennit's rules computed in one backward step per layer, without the work Zennit's own hooks throw away.

Zennit runs a rule (a :py:class:`zennit.core.BasicHook`) by letting autograd compute the layer's ordinary input
gradient, discarding it, re-running the layer's forward once per modifier and backpropagating through those copies.
:py:class:`SinglePass` wraps any composite so that each rule's relevance is computed by one custom autograd node
instead:

- the layer's ordinary gradient is never computed (its graph is dropped right after the forward pass);
- rules whose modifiers are all the identity (``Epsilon`` and ``Norm`` unless ``zero_params`` is set) reuse the
  forward pass's own output instead of re-running the layer;
- ``ZPlus`` on a Linear/Conv/ConvTranspose layer whose input has no negative entry (the usual case after a ReLU)
  runs only its positive half: the negative half's input is zero, so its output and its share of the relevance are
  exactly zero;
- ``Pass`` hands the relevance through without the activation's own backward.

The relevance is that of the wrapped composite: each rule's own modifiers, gradient mapper and reducer do the
arithmetic, so custom rules and parameters are honoured. One difference: for a module called several times, Zennit's
hooks use the input of the last call for every call, SinglePass each call's own (as Zennit does for a copy of the
module per call). Differentiating the relevance (``create_graph=True``) raises a RuntimeError.
'''
import inspect

import torch
from zennit.core import BasicHook, Composite, Hook, ParamMod, RemovableHandle, RemovableHandleList, Stabilizer
from zennit.rules import Epsilon, NoMod, Norm, Pass, ZPlus

from .checks import check_model


class _RelevanceNode(torch.autograd.Function):
    '''Return the first tensor of ``boxed`` as the node's output; in the backward pass, map its relevance to the
    input's with ``relevance_fn(grad_output, *saved)``, ``saved`` being the other tensors of ``boxed`` (a tuple, so
    autograd takes none of them for an input: the output is not made a view, and the saved tensors keep their own
    graphs, which autograd frees with the node's unless the graph is retained).'''
    @staticmethod
    def forward(ctx, relevance_fn, input, boxed):
        ctx.relevance_fn = relevance_fn
        ctx.save_for_backward(*boxed[1:])
        return boxed[0]

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError('SinglePass does not support differentiating the relevance (create_graph=True); use '
                               'the composite without SinglePass for that.')
        return None, ctx.relevance_fn(grad_output, *ctx.saved_tensors), None


def has_identity_params(param_modifier):
    '''Whether a Zennit parameter modifier leaves every parameter as it is (``NoMod`` without ``zero_params``, or a
    modifier that touches no parameter).'''
    modifier = ParamMod.ensure(param_modifier)
    return modifier.param_keys == [] or (type(modifier) is NoMod and not modifier.zero_params)


def normalizer(rule):
    '''For Zennit's ``Epsilon``, ``Norm`` and ``ZPlus``, whose gradient mapper divides the output relevance by the
    stabilised sum of the outputs, a function ``(grad_output, output) -> grad_output / stabilised output`` computing
    the same numbers in fewer passes; None for other rules or stabilisers.

    Zennit's default stabiliser adds ``epsilon`` with the sign of each entry (``+epsilon`` for zeros); here that is
    three passes (compare, select, add) instead of six.
    '''
    if type(rule) not in (Epsilon, Norm, ZPlus):
        return None
    stabilizer = inspect.getclosurevars(rule.gradient_mapper).nonlocals.get('stabilizer_fn')
    if type(stabilizer) is not Stabilizer or stabilizer.clip or stabilizer.norm_scale:
        return None
    epsilon = stabilizer.epsilon

    def normalize(grad_output, output):
        shift = torch.where(output < 0, output.new_full((), -epsilon), output.new_full((), epsilon))
        return grad_output / (output + shift)
    return normalize


def is_affine_layer(module):
    '''Whether ``module`` maps a zero input to zero once its bias is zero (Linear, Conv and ConvTranspose layers,
    including this package's bias-map convolutions).'''
    parameters = {name for name, _ in module.named_parameters(recurse=False)}
    return (isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
            and parameters <= {'weight', 'bias'})


def modified_forward(module, param_modifier, input):
    '''``module.forward(input)`` (hooks skipped) with the parameters a Zennit parameter modifier gives, recording the
    graph.'''
    with ParamMod.ensure(param_modifier)(module) as modified, torch.enable_grad():
        return modified.forward(input)


def rule_relevance(rule, module, input, grad_output):
    '''Relevance of ``module``'s input under the Zennit rule ``rule`` (a :py:class:`zennit.core.BasicHook`), computed
    as :py:meth:`zennit.core.BasicHook.backward` does, one forward and backward pass per modifier.

    Parameters
    ----------
    rule: :py:class:`zennit.core.BasicHook`
    module: :py:obj:`torch.nn.Module`
    input: :py:obj:`torch.Tensor`
        The module's input (any shape the module takes; no gradient needed).
    grad_output: :py:obj:`torch.Tensor`
        The relevance of the module's output.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The relevance of ``input``, same shape.
    '''
    inputs, outputs = [], []
    for input_modifier, param_modifier, output_modifier in zip(
            rule.input_modifiers, rule.param_modifiers, rule.output_modifiers):
        modified_input = input_modifier(input.detach()).requires_grad_()
        outputs.append(output_modifier(modified_forward(module, param_modifier, modified_input)))
        inputs.append(modified_input)
    gradients = torch.autograd.grad(outputs, inputs, grad_outputs=rule.gradient_mapper(grad_output, outputs))
    return rule.reducer(inputs, gradients)


def zplus_relevance(rule, module, input, grad_output, normalize=None):
    ''':py:func:`rule_relevance` for Zennit's ``ZPlus`` on an affine layer (see :py:func:`is_affine_layer`).

    ZPlus sums a positive half (input clamped at 0 from below, weights and bias likewise) and a negative half (input
    clamped from above, weights too, bias zero). Where ``input`` has no negative entry the negative half's input is
    zero, so its output and its term of the relevance are exactly zero, and the positive half's input is the input
    itself: one forward and one backward pass of the layer remain. ``normalize`` is the rule's
    :py:func:`normalizer`, if it has one; without it, inputs with negative entries go to :py:func:`rule_relevance`.
    '''
    signed = input.numel() > 0 and not input.min() >= 0  # NaN counts as signed
    if signed and normalize is None:
        return rule_relevance(rule, module, input, grad_output)
    if signed:
        inputs = [modifier(input.detach()).requires_grad_() for modifier in rule.input_modifiers]
    else:
        inputs = [input.detach().requires_grad_()]
    outputs = [modified_forward(module, param_modifier, modified_input)
               for modified_input, param_modifier in zip(inputs, rule.param_modifiers)]
    if normalize is None:
        normalised, _ = rule.gradient_mapper(grad_output, outputs)
    else:
        total = outputs[0].detach() + outputs[1].detach() if signed else outputs[0].detach()
        normalised = normalize(grad_output, total)
    gradients = torch.autograd.grad(outputs, inputs, grad_outputs=[normalised] * len(outputs))
    relevance = inputs[0].detach() * gradients[0]
    if signed:
        relevance = relevance + inputs[1].detach() * gradients[1]
    return relevance


class SinglePassHook(Hook):
    '''Hook that computes the relevance of a Zennit rule in one custom autograd node per module call.

    The module runs on a detached input (a copy, for in-place modules), so autograd records nothing inside it; the
    node that replaces its output connects the module's original input to the output and maps relevance with the
    rule. Only rules that reuse the forward pass (see :py:meth:`reuses_forward`) keep the module's graph.

    Parameters
    ----------
    rule: :py:class:`zennit.core.BasicHook` or :py:class:`zennit.rules.Pass`
        The rule whose relevance to compute; only its modifiers, gradient mapper and reducer are used.
    '''
    def __init__(self, rule, normalize=None):
        super().__init__()
        self.rule = rule
        # the rule's normalizer; copies for further modules take it over instead of reading the rule again
        self.normalize = normalizer(rule) if normalize is None else normalize
        self.calls = []  # (original input, whether the module's graph is kept), one per call in progress

    def copy(self):
        '''A hook for another module with the same rule (rules keep no per-module state here).'''
        return SinglePassHook(self.rule, self.normalize)

    def register(self, module):
        '''Register the forward pre-hook and forward hook on ``module``; returns the handles that remove them.'''
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_forward),
            module.register_forward_hook(self.forward),
        ])

    def remove(self):
        '''Forget the inputs of calls that never finished, and remove the hooks.'''
        self.calls.clear()
        super().remove()

    def pre_forward(self, module, input):
        '''Keep the original input and hand the module a detached one (or leave it where the graph is reused).

        Raises
        ------
        TypeError
            If the module is called with other than one tensor.
        '''
        if not self.active:
            return None
        if len(input) != 1 or not isinstance(input[0], torch.Tensor):
            raise TypeError(f'SinglePass supports modules called with one tensor; {type(module).__name__} got '
                            f'{len(input)} input(s). Use the composite without SinglePass for this model.')
        original, = input
        if not original.requires_grad:
            self.calls.append(None)
            return None
        in_place = getattr(module, 'inplace', False)
        keeps_graph = not in_place and self.reuses_forward(original)
        self.calls.append((original, keeps_graph))
        if keeps_graph:
            return None
        # an in-place module writes to a copy, as under Zennit's own hooks, so the original input stays as it was
        return (original.detach().clone() if in_place else original.detach(),)

    def forward(self, module, input, output):
        '''Replace ``output`` by a copy whose backward pass computes the rule's relevance.

        Raises
        ------
        TypeError
            If the module returns other than one tensor, or the rule is Pass and the shapes differ.
        '''
        call = self.calls.pop() if self.calls else None
        if call is None:
            return None
        original, keeps_graph = call
        if not isinstance(output, torch.Tensor):
            raise TypeError(f'SinglePass supports modules that return one tensor; {type(module).__name__} returned '
                            f'{type(output).__name__}. Use the composite without SinglePass for this model.')
        relevance_fn, saved = self.relevance_function(module, original, output, keeps_graph)
        # where the rule reads ``output`` later, pass on a copy, so in-place operations after the module (such as
        # ReLU(inplace=True)) leave it as it was
        passed_on = output.detach().clone() if keeps_graph else output.detach()
        return _RelevanceNode.apply(relevance_fn, original, (passed_on, *saved))

    def relevance_function(self, module, input, output, keeps_graph):
        '''The function ``(grad_output, *saved) -> relevance`` of the backward node, the cheapest exact way for this
        rule, module and call, and the tensors ``saved`` it needs.'''
        rule = self.rule
        if isinstance(rule, Pass):
            if input.shape != output.shape:
                raise TypeError(f'the Pass rule needs an output shaped like the input; {type(module).__name__} maps '
                                f'{tuple(input.shape)} to {tuple(output.shape)}')
            return (lambda grad_output: grad_output), ()
        normalize = self.normalize
        if keeps_graph and rule.output_modifiers[0](output) is output:
            # the rule's forward is the forward itself: take its output and differentiate the graph it left (kept
            # for as long as autograd keeps this node's saved tensors, so retain_graph=True works as usual)
            def reused(grad_output, input, output):
                if normalize is None:
                    normalised = rule.gradient_mapper(grad_output, [output])
                else:
                    normalised = normalize(grad_output, output.detach())
                gradient, = torch.autograd.grad(output, input, grad_outputs=normalised, retain_graph=True)
                return rule.reducer([input.detach()], [gradient])
            return reused, (input, output)
        if type(rule) is ZPlus and is_affine_layer(module):
            return (lambda grad_output, input: zplus_relevance(rule, module, input, grad_output, normalize)), (input,)
        return (lambda grad_output, input: rule_relevance(rule, module, input, grad_output)), (input,)

    def reuses_forward(self, input):
        '''Whether the rule's single set of input and parameter modifiers is the identity, so the module's own
        forward pass and graph serve as the rule's.'''
        rule = self.rule
        return (isinstance(rule, BasicHook) and len(rule.input_modifiers) == 1
                and has_identity_params(rule.param_modifiers[0]) and rule.input_modifiers[0](input) is input)


HOOK_METHODS = ('pre_forward', 'post_forward', 'forward', 'pre_backward', 'backward')


def computes_as(rule, base):
    '''Whether ``rule`` is a ``base`` (BasicHook or Pass) that computes as ``base`` does: it may bring its own
    modifiers, gradient mapper and reducer, but no hook method of its own.'''
    return isinstance(rule, base) and all(getattr(type(rule), name) is getattr(base, name) for name in HOOK_METHODS)


def single_pass_rule(rule):
    '''The hook computing ``rule`` in a single pass, or ``rule`` itself (None stays None) where it is not a
    :py:class:`zennit.core.BasicHook` or :py:class:`zennit.rules.Pass`, or overrides how they compute.'''
    if computes_as(rule, BasicHook) or computes_as(rule, Pass):
        return SinglePassHook(rule)
    return rule


class SinglePass(Composite):
    '''A composite with the rules and canonizers of ``composite``, each rule computed in a single pass.

    The relevance equals that of ``composite`` (see the module docstring for what is skipped, and the one
    difference, for modules called several times); use it wherever the composite would go, except where the relevance
    itself is differentiated (``create_graph=True``)::

        composite = SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()]))
        with Gradient(model, composite) as attributor:
            output, relevance = attributor(input, target)

    Parameters
    ----------
    composite: :py:class:`zennit.core.Composite`
        The composite whose rule for each module (its ``module_map``) and canonizers are used; it is not changed,
        but its canonizer objects are shared, so do not register both at once.
    '''
    def __init__(self, composite):
        self.composite = composite

        def module_map(ctx, name, module):
            return single_pass_rule(composite.module_map(ctx, name, module))

        super().__init__(module_map=module_map, canonizers=composite.canonizers)

    def register(self, module):
        '''Apply the canonizers and register the single-pass hooks on ``module``, as
        :py:meth:`zennit.core.Composite.register` does.

        Raises
        ------
        TypeError
            If ``module`` is not a torch.nn.Module or holds a TorchScript module, whose compiled forward runs no hooks
            (pass the original module).
        '''
        check_model(module, 'SinglePass')
        super().register(module)
