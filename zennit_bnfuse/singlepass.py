'''Zennit's rules computed in one backward step per layer, without the work Zennit's own hooks throw away.

Zennit runs a rule (a :py:class:`zennit.core.BasicHook`) by letting autograd compute the layer's ordinary input
gradient, discarding it, re-running the layer's forward once per modifier and backpropagating through those copies.
:py:class:`SinglePass` wraps any composite so that each rule's relevance is computed by one custom autograd node
instead:

- the layer's ordinary gradient is never computed (the layer runs on a detached input);
- rules whose modifiers are all the identity (``Epsilon`` and ``Norm`` unless ``zero_params`` is set) reuse the
  forward pass's own output instead of re-running the layer;
- on convolutions (zero padding, the forward of torch's own classes), each modified copy of the layer runs without
  autograd and its input gradient comes from one ``aten.convolution_backward`` call, the kernel autograd calls;
- ``ZPlus`` on a Linear/Conv/ConvTranspose layer whose input has no negative entry (the usual case after a ReLU)
  runs only its positive half: the negative half's input is zero, so its output and its share of the relevance are
  exactly zero. Which inputs cannot be negative is read from the traced graph (:py:mod:`zennit_bnfuse.signs`), so a
  GPU does not synchronise per layer; only where the graph cannot tell (the model's input, untraceable models) is
  the data checked;
- ``Flat`` on a convolution computes its output (a count of the input entries each output reads, the same for every
  sample) for one sample and broadcasts it, where the dtype holds those counts exactly;
- residual additions written as :py:class:`~zennit_bnfuse.layers.AddOperands` get the ``Sum`` rule without stacking
  their operands;
- ``Pass`` hands the relevance through without the activation's own backward.

The relevance is that of the wrapped composite: each rule's own modifiers, gradient mapper and reducer do the
arithmetic, so custom rules and parameters are honoured, and the tests compare it with Zennit's hooks with
``torch.equal``. Modules or calls SinglePass does not compute (rules that bring their own hook methods, modules
called with several inputs or keyword arguments, modules that return something other than one tensor) fall back to
Zennit's own hook for that module only, and are listed in :py:attr:`SinglePass.fallbacks`.

One difference: for a module called several times, Zennit's hooks use the input of the last call for every call,
SinglePass each call's own (as Zennit does for a copy of the module per call). Differentiating the relevance
(``create_graph=True``) raises a RuntimeError.
'''
import inspect
import math
import weakref
from typing import NamedTuple

import torch
from zennit.core import BasicHook, Composite, Hook, ParamMod, RemovableHandle, RemovableHandleList, Stabilizer
from zennit.rules import Epsilon, Flat, NoMod, Norm, Pass, WSquare, ZPlus

from .aliasing import inputs_written_after, modules_of
from .checks import check_composite, check_model, global_hooks
from .graph import LRPTracer
from .specialization import trace_for_call
from .graph_layers import AddOperands
from .handling import is_random_in_training
from .layers import BiasMapConvMixin, FoldedLayerMixin, ThresholdReLU
from .pairs import tracing_copy
from .prepared import attribute_values
from .registration import forget_call, module_hooks
from .signs import NON_NEGATIVE, UNKNOWN, SignAnalysis, ValueKeepingHook, own_hooks

# how a call is computed (see SinglePassHook.plan)
PASS, OPERANDS, THRESHOLD, REUSED, GRAPH, CONV, GENERIC = (
    'pass', 'operands', 'threshold', 'reused', 'graph', 'conv', 'generic')
FALLBACK = 'fallback'
# the code of Zennit's Flat parameter modifier (parameters to ones; its ParamMod zeroes the bias)
FLAT_WEIGHTS = Flat().param_modifiers[0].modifier.__code__
# the forward methods under which a convolution is ``conv(input, weight) + bias`` with the module's own settings
CONV_FORWARDS = {cls.forward for cls in (
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d, BiasMapConvMixin)}
# the methods those forwards call, as torch defines them (a subclass may override one: ``_conv_forward`` with scaled
# weights)
CONV_HELPERS = {torch.nn.Conv1d._conv_forward, torch.nn.Conv2d._conv_forward, torch.nn.Conv3d._conv_forward,
                torch.nn.modules.conv._ConvNd._conv_forward, torch.nn.modules.conv._ConvTransposeNd._output_padding}


class Fallback(NamedTuple):
    '''A module whose rule is computed by Zennit's (or Captum's) own hooks instead of in a single pass, and why.'''
    module: str
    rule: object
    reason: str


class RelevanceNode(torch.autograd.Function):
    '''Return the first tensor of ``boxed`` as the node's output; in the backward pass, map its gradient (relevance)
    to that of each of ``inputs`` with ``relevance_fn(grad_output, *saved)``, ``saved`` being the other tensors of
    ``boxed`` (a tuple, so autograd takes none of them for an input: the output is not made a view, and the saved
    tensors keep their own graphs, which autograd frees with the node's unless the graph is retained). Both
    single-pass engines (this module's and :py:mod:`zennit_bnfuse.captum_singlepass`) are made of these nodes.'''
    @staticmethod
    def forward(ctx, relevance_fn, boxed, *inputs):
        ctx.relevance_fn = relevance_fn
        ctx.save_for_backward(*boxed[1:])
        return boxed[0]

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError('the single-pass engines do not support differentiating the relevance '
                               '(create_graph=True); use Zennit\'s or Captum\'s own hooks for that (the composite '
                               'without SinglePass, engine=\'zennit\' or engine=\'captum\').')
        return None, None, *ctx.relevance_fn(grad_output, *ctx.saved_tensors)


def has_identity_params(param_modifier, module=None):
    '''Whether a Zennit parameter modifier leaves every parameter (of ``module``, if given) as it is: ``NoMod``
    without ``zero_params``, a modifier that touches no parameter, or one for a module that has none of the
    parameters it names.'''
    modifier = ParamMod.ensure(param_modifier)
    if modifier.param_keys == [] or (type(modifier) is NoMod and not modifier.zero_params):
        return True
    if module is None:
        return False
    own = dict(module.named_parameters(recurse=False))
    keys = list(own) if modifier.param_keys is None else modifier.param_keys
    if modifier.require_params and any(not hasattr(module, key) for key in keys):
        return False  # Zennit raises for the missing parameter; so does the general path
    return all(getattr(module, key, None) is None for key in keys)


def stabilizer_epsilon(rule):
    '''The epsilon of Zennit's default stabiliser in the gradient mapper of an ``Epsilon``, ``Norm``, ``ZPlus``,
    ``Flat`` or ``WSquare`` rule (each divides the output relevance by the stabilised first output), or None for other
    rules, stabilisers and negative epsilons.'''
    if type(rule) not in (Epsilon, Norm, ZPlus, Flat, WSquare):
        return None
    stabilizer = inspect.getclosurevars(rule.gradient_mapper).nonlocals.get('stabilizer_fn')
    if type(stabilizer) is not Stabilizer or stabilizer.clip or stabilizer.norm_scale:
        return None
    # a negative epsilon moves outputs towards 0, which the faster paths (copysign, z+'s +epsilon) do not do
    return stabilizer.epsilon if stabilizer.epsilon >= 0 else None


def stabilized(output, epsilon):
    '''``output`` plus ``epsilon`` with the sign of each entry (``+epsilon`` for zeros of either sign): Zennit's default
    stabiliser, bit for bit, in three fast passes instead of six and one new tensor (``output + 0.0`` turns ``-0.0``
    into ``+0.0``, whose sign ``copysign`` then gives to ``epsilon``, in the same memory); no graph is recorded. Also
    Captum's ``z + sign(z) * epsilon``, which for a negative ``epsilon`` moves ``z`` towards 0 (one pass more).'''
    output = output.detach()
    denominator = output + 0.0
    torch.copysign(denominator.new_full((), abs(epsilon)), denominator, out=denominator)
    if epsilon < 0:  # sign(z) * epsilon moves z towards 0
        denominator.neg_()
    return denominator.add_(output)


def normalizer(rule):
    '''For Zennit's ``Epsilon``, ``Norm``, ``ZPlus``, ``Flat`` and ``WSquare``, whose gradient mapper divides the
    output relevance by the stabilised first output (``ZPlus``: the sum of the outputs), a function
    ``(grad_output, output) -> grad_output / stabilised output`` computing the same numbers in fewer passes (see
    :py:func:`stabilized`); None for other rules or stabilisers.'''
    epsilon = stabilizer_epsilon(rule)
    if epsilon is None:
        return None

    def normalize(grad_output, output):
        return grad_output / stabilized(output, epsilon)
    normalize.epsilon = epsilon
    return normalize


def is_affine_layer(module):
    '''Whether ``module`` maps a zero input to zero once its bias is zero (Linear, Conv and ConvTranspose layers,
    including this package's bias-map convolutions).'''
    parameters = {name for name, _ in module.named_parameters(recurse=False)}
    return (isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
            and parameters <= {'weight', 'bias'})


def computing_forward(cls):
    '''The forward method of ``cls`` that computes the output: a fused layer's (:py:class:`FoldedLayerMixin`) only
    checks the input's rank and calls the next one.'''
    return next(vars(klass)['forward'] for klass in cls.__mro__
                if 'forward' in vars(klass) and klass is not FoldedLayerMixin)


def uses_torchs_method(module, name):
    '''Whether ``module`` has no method ``name`` or torch's own (see :py:data:`CONV_HELPERS`).'''
    method = getattr(module, name, None)
    return method is None or getattr(method, '__func__', None) in CONV_HELPERS


def is_plain_convolution(module):
    '''Whether ``module``'s forward is ``conv(input, weight) + bias`` with its own stride, padding (zeros, given as
    numbers), dilation and groups, so that :py:func:`convolution_input_gradient` is its input gradient.'''
    return (is_affine_layer(module) and isinstance(module, torch.nn.modules.conv._ConvNd)
            and computing_forward(type(module)) in CONV_FORWARDS and 'forward' not in vars(module)
            and all(uses_torchs_method(module, name) for name in ('_conv_forward', '_output_padding'))
            and module.padding_mode == 'zeros' and not isinstance(module.padding, str))


def convolution_input_gradient(module, input, weight, grad_output):
    '''The gradient of ``module``'s convolution with ``weight`` at ``input`` for ``grad_output``: the same
    ``aten.convolution_backward`` call, and so the same numbers, as autograd's, without recording a graph.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        A convolution for which :py:func:`is_plain_convolution` holds.
    input, weight, grad_output: :py:obj:`torch.Tensor`
        The input ``(N, C_in, ...)`` (or ``(C_in, ...)``, unbatched, as torch's convolutions take it), the (modified)
        weight and the gradient of the output.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shaped like ``input``.
    '''
    if input.dim() < weight.dim():  # unbatched: the backward kernel wants a batch of one
        return convolution_input_gradient(module, input[None], weight, grad_output[None])[0]
    return torch.ops.aten.convolution_backward(
        grad_output, input, weight, None, module.stride, module.padding, module.dilation, module.transposed,
        module.output_padding, module.groups, [True, False, False])[0]


def modified_forward(module, param_modifier, input):
    '''``module.forward(input)`` (hooks skipped) with the parameters a Zennit parameter modifier gives, recording the
    graph.'''
    with ParamMod.ensure(param_modifier)(module) as modified, torch.enable_grad():
        return modified.forward(input)


def returns_its_argument(modifier, like):
    '''Whether the input or output modifier ``modifier`` of a Zennit rule is the identity: it returns its argument,
    unchanged. Tried on an empty tensor shaped like ``like`` past its first dimension, so that a modifier working in
    place changes nothing of the caller's; a modifier that fails on it counts as not the identity.'''
    probe = like.new_empty((0, *like.shape[1:]))
    version = probe._version
    try:
        return modifier(probe) is probe and probe._version == version
    except Exception:
        return False


def all_identity(modifiers, like):
    '''Whether every modifier in ``modifiers`` is the identity (see :py:func:`returns_its_argument`).'''
    return all(returns_its_argument(modifier, like) for modifier in modifiers)


def is_non_negative(input):
    '''Whether ``input`` has no negative (or NaN) entry; reads the data (on a GPU, a synchronisation).'''
    return input.numel() == 0 or bool(input.min() >= 0)


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
        with torch.enable_grad():  # the output modifier is part of the graph differentiated below
            outputs.append(output_modifier(modified_forward(module, param_modifier, modified_input)))
        inputs.append(modified_input)
    mapped = rule.gradient_mapper(grad_output, outputs)
    mapped = [mapped] if isinstance(mapped, torch.Tensor) else mapped  # one tensor for one output, or one each
    gradients = torch.autograd.grad(outputs, inputs, grad_outputs=[
        in_output_layout(gradient, output) for gradient, output in zip(mapped, outputs)])
    return rule.reducer(inputs, gradients)


def modified_convolution(module, param_modifier, input, cache=None):
    '''The output of the convolution ``module`` at ``input`` with the parameters a Zennit parameter modifier gives,
    without autograd, and the modified weight.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        A convolution for which :py:func:`is_plain_convolution` holds.
    param_modifier: :py:class:`zennit.core.ParamMod` or callable
    input: :py:obj:`torch.Tensor`
    cache: dict, optional
        Where to keep the modified parameters, by parameter modifier, for the next call: they are computed again
        only when a parameter is replaced, changed in place (its version counter) or given new memory (its data
        pointer, dtype and strides: ``Module.to()`` swaps ``.data``). Writes into the same memory through ``.data``
        are not seen, so only for a model this package owns.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        The output and the modified weight.
    '''
    if cache is None or module.transposed:
        with torch.no_grad(), ParamMod.ensure(param_modifier)(module) as modified:
            return modified.forward(input), modified.weight.detach()
    sources = tuple((parameter, (parameter._version, parameter.data_ptr(), parameter.dtype, parameter.stride()))
                    for parameter in (module.weight, module.bias) if parameter is not None)
    cached = cache.get(param_modifier)
    if cached is None or len(cached[0]) != len(sources) or any(
            parameter is not other or state != other_state
            for (parameter, state), (other, other_state) in zip(sources, cached[0])):
        with torch.no_grad(), ParamMod.ensure(param_modifier)(module) as modified:
            bias = None if modified.bias is None else modified.bias.detach()
            cached = cache[param_modifier] = sources, (modified.weight.detach(), bias)
    weight, bias = cached[1]
    with torch.no_grad():
        # what the module's forward computes with these parameters
        if isinstance(module, BiasMapConvMixin):
            return module._conv_forward(input, weight, None) + bias, weight
        return module._conv_forward(input, weight, bias), weight


def convolution_relevance(rule, module, input, grad_output, normalize=None, non_negative=None, cache=None):
    ''':py:func:`rule_relevance` for a convolution for which :py:func:`is_plain_convolution` holds, without autograd:
    each modified copy of the layer runs under ``torch.no_grad()`` and its input gradient comes from
    :py:func:`convolution_input_gradient`.

    ``ZPlus`` sums a positive half (input clamped at 0 from below, weights and bias likewise) and a negative half
    (input clamped from above, weights too, bias zero). Where ``input`` has no negative entry the negative half's input
    is zero, so its output and its term of the relevance are exactly zero, and the positive half's input is the input
    itself: one forward and one backward pass of the layer remain. Both halves' outputs are sums of non-negative
    products, so Zennit's stabiliser adds ``+epsilon`` everywhere: one pass instead of three.

    Parameters
    ----------
    rule: :py:class:`zennit.core.BasicHook`
        Its output modifiers must be the identity (else this falls back to :py:func:`rule_relevance`).
    module: :py:obj:`torch.nn.Module`
    input, grad_output: :py:obj:`torch.Tensor`
        As for :py:func:`rule_relevance`.
    normalize: callable, optional
        The rule's :py:func:`normalizer`, if it has one.
    non_negative: bool or None, optional
        Whether ``input`` is known to have no negative entry (from the graph); None reads the data where it matters
        (``ZPlus`` only).
    cache: dict, optional
        See :py:func:`modified_convolution`.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The relevance of ``input``, same shape.
    '''
    input = input.detach()
    if not all_identity(rule.output_modifiers, grad_output):
        return rule_relevance(rule, module, input, grad_output)
    if normalize is not None and counts_per_sample(rule, module, input):
        return flat_relevance(rule, module, input, grad_output, normalize.epsilon, cache)
    modifiers = list(zip(rule.input_modifiers, rule.param_modifiers, rule.output_modifiers))
    zplus = type(rule) is ZPlus
    one_half = zplus and (is_non_negative(input) if non_negative is None else non_negative)
    if one_half:
        modifiers, inputs = modifiers[:1], [input]
    else:
        inputs = [input_modifier(input) for input_modifier, _, _ in modifiers]
    outputs, weights = [], []
    for modified_input, (_, param_modifier, _) in zip(inputs, modifiers):
        output, weight = modified_convolution(module, param_modifier, modified_input, cache)
        outputs.append(output)
        weights.append(weight)
    if normalize is None:
        grad_outputs = rule.gradient_mapper(grad_output, outputs)
        if isinstance(grad_outputs, torch.Tensor):  # a single tensor counts as one, as for torch.autograd.grad
            grad_outputs = [grad_outputs]
    elif zplus:
        # z+ is non-negative (-0.0 included), where Zennit's stabiliser adds +epsilon; the outputs are ours to
        # overwrite
        total = outputs[0] if one_half else outputs[0].add_(outputs[1])
        grad_outputs = [torch.div(grad_output, total.add_(normalize.epsilon), out=total)] * len(outputs)
    else:
        total = outputs[0] if len(outputs) == 1 else outputs[0] + outputs[1]
        grad_outputs = [normalize(grad_output, total)] * len(outputs)
    gradients = [convolution_input_gradient(module, modified_input, weight, gradient)
                 for modified_input, weight, gradient in zip(inputs, weights, grad_outputs)]
    if one_half:
        return gradients[0].mul_(input)
    if zplus:
        # ZPlus's reducer, inputs[0] * gradients[0] + inputs[1] * gradients[1], into the gradients (ours)
        return gradients[0].mul_(inputs[0]).add_(gradients[1].mul_(inputs[1]))
    return rule.reducer(inputs, gradients)


def counts_per_sample(rule, module, input):
    '''Whether Zennit's ``Flat`` on the plain convolution ``module`` (:py:func:`is_plain_convolution`) can be computed
    by :py:func:`flat_relevance`: ``input`` has a batch dimension and every output of the layer under the rule (ones in,
    weights of ones or zeros, zero bias) is a count the dtype holds exactly, so that its sums are the same numbers in
    any order and for any batch size.'''
    if (type(rule) is not Flat or len(rule.input_modifiers) != 1 or len(rule.param_modifiers) != 1
            or rule.input_modifiers[0] is not torch.ones_like):
        return False
    param_modifier = rule.param_modifiers[0]
    if (type(param_modifier) is not ParamMod or getattr(param_modifier.modifier, '__code__', None) is not FLAT_WEIGHTS
            or param_modifier.param_keys is not None or 'bias' not in (param_modifier.zero_params or ())):
        return False  # not Flat's own weights of ones on every parameter, bias zeroed
    if input.dim() != len(module.kernel_size) + 2 or not input.dtype.is_floating_point:
        return False
    # the most entries one output sums: input channels per group times kernel taps
    terms = module.in_channels // module.groups * math.prod(module.kernel_size)
    return terms <= 2 ** (1 - math.log2(torch.finfo(input.dtype).eps))  # 2 ** significand bits: exact integers


def flat_relevance(rule, module, input, grad_output, epsilon, cache=None):
    '''Zennit's ``Flat`` (with its default stabiliser) on a convolution for which :py:func:`counts_per_sample`
    holds, the same numbers with one new tensor shaped like the output instead of seven: the layer's output under the
    rule does not depend on the input's values, so it is computed for one sample of ones and broadcast over the batch;
    it is non-negative, so the stabiliser adds ``+epsilon``.

    Parameters
    ----------
    rule: :py:class:`zennit.rules.Flat`
    module: :py:obj:`torch.nn.Module`
    input, grad_output: :py:obj:`torch.Tensor`
        The input ``(N, C_in, ...)`` (only its shape and layout are read) and the relevance of the output
        ``(N, C_out, ...)``.
    epsilon: float
        The stabiliser's epsilon.
    cache: dict, optional
        See :py:func:`modified_convolution`.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The relevance of ``input``, same shape.
    '''
    ones = torch.ones_like(input[:1])
    counts, weight = modified_convolution(module, rule.param_modifiers[0], ones, cache)
    gradient = convolution_input_gradient(module, input, weight, torch.div(grad_output, counts.add_(epsilon)))
    return rule.reducer([ones.expand_as(input)], [gradient])


def zplus_relevance(rule, module, input, grad_output, normalize=None, non_negative=None):
    ''':py:func:`rule_relevance` for Zennit's ``ZPlus`` on an affine layer (see :py:func:`is_affine_layer`) that is not
    a plain convolution (Linear, or a convolution with its own forward), with the one-half shortcut of
    :py:func:`convolution_relevance`; without a ``normalize``, inputs with negative entries go to
    :py:func:`rule_relevance`.'''
    signed = not (is_non_negative(input) if non_negative is None else non_negative)
    if (signed and normalize is None) or not all_identity(rule.output_modifiers, grad_output):
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
    gradients = torch.autograd.grad(outputs, inputs, grad_outputs=[in_output_layout(normalised, output)
                                                                   for output in outputs])
    relevance = inputs[0].detach() * gradients[0]
    if signed:
        relevance = relevance + inputs[1].detach() * gradients[1]
    return relevance


def operand_relevance(operands, normalised, overwrite=False, spare=None, sum_first=False):
    '''The relevance of each operand of a residual sum, given the normalised relevance of the sum (the output's
    relevance over the stabilised sum): each operand times it.

    An operand broadcast in the sum gets, by default, its products summed back over the broadcast dims (Zennit's
    ``Norm`` or ``Epsilon`` on the stack of the broadcast operands, :py:class:`~zennit_bnfuse.layers.AddOperands`);
    with ``sum_first``, the normalised relevance summed back first, times the operand (autograd's gradient of the sum
    times the input, as Captum's hooks on an ``Addition_Module`` compute it). With ``overwrite``, ``normalised`` (a
    tensor of the caller's) holds the last operand's relevance afterwards, one new tensor less; ``spare``, a tensor of
    the caller's shaped like ``normalised`` and no longer needed, holds the relevance of the first operand before the
    last that is shaped like ``normalised`` too (if any), another one less.'''
    relevance = []
    for index, operand in enumerate(operands):
        if operand.shape != normalised.shape:
            if sum_first:
                relevance.append(normalised.sum_to_size(operand.shape) * operand)
            else:
                relevance.append((operand.expand_as(normalised) * normalised).sum_to_size(operand.shape))
        elif overwrite and index == len(operands) - 1:
            relevance.append(normalised.mul_(operand))
        elif spare is not None:
            relevance.append(torch.mul(operand, normalised, out=spare))
            spare = None
        else:
            relevance.append(operand * normalised)
    return tuple(relevance)


def sum_relevance(module, operands, grad_output, stabilize, sum_first=False):
    '''The relevance of each operand of the residual sum ``module`` (:py:class:`~zennit_bnfuse.layers.AddOperands`,
    Captum's ``Addition_Module``) under an epsilon rule, from nothing but the operands: the sum again (the module's
    own forward, the same numbers bit for bit), ``stabilize(sum)`` (a new tensor, which then holds the normalised
    relevance and the last operand's relevance), the sum's own memory for the first operand's (see
    :py:func:`operand_relevance`, which ``sum_first`` goes to).'''
    operands = [operand.detach() for operand in operands]
    with torch.no_grad():
        total = module.forward(*operands)
    denominator = stabilize(total)
    spare = None if any(total is operand for operand in operands) else total
    return operand_relevance(operands, torch.div(grad_output, denominator, out=denominator), overwrite=True,
                             spare=spare, sum_first=sum_first)


def threshold_function(module):
    '''The relevance function of a :py:class:`~zennit_bnfuse.ThresholdReLU` under Zennit's ``Epsilon`` or ``Norm``
    without modifiers, ``(grad_output, denominator, input) -> (relevance,)``, given ``denominator = output +
    epsilon`` (the output of a ReLU is non-negative, where Zennit's stabiliser adds ``+epsilon``): the numbers
    autograd gives through the module's forward (clamp: the gradient where the pre-activation is at least 0, else 0;
    times the sign), without recording it.'''
    def relevance(grad_output, denominator, input):
        input = input.detach()
        kept = module.pre_activation(input) >= 0
        gradient = (grad_output / denominator).masked_fill_(~kept, 0)
        shape = (1, -1) + (1,) * (input.ndim - 2)
        return (gradient.mul_(module.sign.reshape(shape)).mul_(input),)
    return relevance


class SinglePassHook(Hook):
    '''Hook that computes the relevance of a Zennit rule in one custom autograd node per module call.

    The module runs on a detached input, so autograd records nothing inside it; the node that replaces its output
    connects the module's original input to the output and maps relevance with the rule. Only rules that reuse the
    forward pass on modules without a faster way keep the module's graph. Calls it cannot compute go to Zennit's own
    hook for the rule (see :py:meth:`unsupported`).

    Parameters
    ----------
    rule: :py:class:`zennit.core.BasicHook` or :py:class:`zennit.rules.Pass`
        The rule whose relevance to compute; only its modifiers, gradient mapper and reducer are used.
    name: str, optional
        The module's name, for :py:attr:`SinglePass.fallbacks`.
    fallbacks: list, optional
        Where to note a :py:class:`Fallback` when a call goes to Zennit's hook.

    Attributes
    ----------
    input_sign: str
        What the graph says about the sign of the module's input (see :py:mod:`zennit_bnfuse.signs`); set by
        :py:class:`SinglePass` when it registers.
    copies_input: bool
        Whether the backward pass reads a copy of the module's input: where an op after the module may write into it
        in place (or the graph cannot tell); set by :py:class:`SinglePass` when it registers.
    '''
    def __init__(self, rule, name=None, fallbacks=None, normalize=None, parameter_cache=None, saved=None):
        self.zennit_hook = None
        super().__init__()
        self.rule = rule
        self.name = name
        self.fallbacks = fallbacks
        self.parameter_cache = parameter_cache
        # the inputs that backward nodes keep, by the memory they live in, shared by a composite's hooks: an in-place
        # module works on a copy only where it would overwrite one of them
        self.saved = weakref.WeakValueDictionary() if saved is None else saved
        # the rule's normalizer; copies for further modules take it over instead of reading the rule again
        self.normalize = normalizer(rule) if normalize is None else normalize
        self.input_sign = UNKNOWN
        self.copies_input = True
        self.fallback_reason = None
        self.shares_input = None  # whether several input modifiers return their argument (read at the first call)
        # the ModeWatch of the model SinglePass registered on: input_sign and copies_input hold while it does
        self.mode_watch = None
        self.calls = []  # one entry per call in progress: None, FALLBACK or (original inputs, kept inputs, plan)

    @property
    def active(self):
        return self._active

    @active.setter
    def active(self, value):
        self._active = value
        if self.zennit_hook is not None:
            self.zennit_hook.active = value

    def copy(self):
        '''A hook for another module with the same rule (rules keep no per-module state here).'''
        return SinglePassHook(self.rule, self.name, self.fallbacks, self.normalize, self.parameter_cache, self.saved)

    def register(self, module):
        '''Register the forward pre-hook and forward hook on ``module``; returns the handles that remove them.'''
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
            module.register_forward_hook(self.forward, with_kwargs=True),
        ])

    def remove(self):
        '''Forget the inputs of calls that never finished, and remove the hooks.'''
        self.calls.clear()
        if self.zennit_hook is not None:
            self.zennit_hook.remove()
        super().remove()

    def forget_call(self):
        '''Forget the calls in progress and what Zennit's hook for the rule kept from them, leaving the hooks
        registered (see :py:class:`~zennit_bnfuse.registration.KeptRegistration`).'''
        self.calls.clear()
        if self.zennit_hook is not None:
            forget_call(self.zennit_hook)

    def fall_back(self, reason):
        '''Send this and later calls to Zennit's own hook for the rule, and note why.'''
        if self.zennit_hook is None:
            self.zennit_hook = self.rule.copy()
            self.zennit_hook.active = self.active
        if self.fallback_reason is None:
            self.fallback_reason = reason
            if self.fallbacks is not None:
                self.fallbacks.append(Fallback(self.name, self.rule, reason))

    def unsupported(self, module, args, kwargs):
        '''Why SinglePass does not compute this call, or None.'''
        if self.fallback_reason is not None:
            return self.fallback_reason
        if own_hooks(module):
            return 'has a forward hook of its own, which may change the output the rule does not compute'
        registered = global_hooks()
        if registered:
            return f'global module hooks are registered ({", ".join(registered)}), which may change its output'
        if kwargs:
            return 'called with keyword arguments'
        if not args or not all(isinstance(arg, torch.Tensor) for arg in args):
            return 'called with an input that is not a tensor'
        if len(args) > 1 and not self.sums_operands(module, args):
            return f'called with {len(args)} inputs'
        if not isinstance(self.rule, Pass) and module.training and is_random_in_training(module):
            return ('is random in training mode: Zennit\'s hook runs it again in the backward pass, drawing new random '
                    'numbers, where the single pass would reuse the forward\'s')
        if self.shares_input is None:
            self.shares_input = (isinstance(self.rule, BasicHook) and len(self.rule.input_modifiers) > 1 and sum(
                returns_its_argument(modifier, args[0]) for modifier in self.rule.input_modifiers) > 1)
        if self.shares_input:
            return ('its rule has several input modifiers that return their argument itself: Zennit\'s hook then '
                    'differentiates all the rule\'s outputs with respect to that one tensor, and hands each modifier '
                    'the sum of their gradients')
        return None

    def graph_holds(self, module):
        '''Whether what the traced graph says (``input_sign``, ``copies_input``) holds for this call: it runs inside
        a forward of the model, which found the model's modules, ``module`` among them, in the training mode they were
        in when SinglePass registered (:py:class:`ModeWatch`; a forward may branch on it).'''
        return self.mode_watch is None or self.mode_watch.holds

    def sums_operands(self, module, args):
        '''Whether this is :py:class:`~zennit_bnfuse.layers.AddOperands` under Zennit's ``Epsilon`` or ``Norm``
        without modifiers, whose relevance :py:func:`operand_relevance` gives.'''
        return (isinstance(module, AddOperands) and type(self.rule) in (Epsilon, Norm)
                and all(self.reuses_forward(module, arg) for arg in args))

    def pre_forward(self, module, args, kwargs):
        '''Keep the original input and hand the module a detached one (or leave it where the graph is reused).'''
        if not self.active:
            self.calls.append(None)
            return None
        if len(module._forward_pre_hooks) > 1:  # someone else's hooks too (Zennit's register two per module)
            self.refuse_other_rules(module)
        reason = self.unsupported(module, args, kwargs)
        if reason is not None:
            self.fall_back(reason)
            self.calls.append(FALLBACK)
            result = self.zennit_hook.pre_forward(module, args)
            return (result if isinstance(result, tuple) else (result,)), kwargs
        if not any(arg.requires_grad for arg in args):
            self.calls.append(None)
            return None
        plan = self.plan(module, args)
        kept = args
        if self.copies_input or not self.graph_holds(module):
            # an op after the module writes into its input: the backward pass reads a copy (Zennit's hooks always
            # copy); under GRAPH the module runs on it, so that its own graph reads the copy too
            kept = tuple(arg.clone() if plan == GRAPH else arg.detach().clone() for arg in args)
        self.calls.append((args, kept, plan))
        if plan == GRAPH:
            return None if kept is args else (kept, kwargs)
        # an in-place module writes to a copy where a backward node keeps its input (Zennit's hooks always copy)
        in_place = getattr(module, 'inplace', False)
        return tuple(arg.detach().clone() if in_place and self.is_saved(arg) else arg.detach() for arg in args), kwargs

    def refuse_other_rules(self, module):
        '''Raise if an active Zennit hook other than this one is registered on ``module``.

        Raises
        ------
        RuntimeError
            If one is: a second composite registered on the same model (an attributor's context inside another's),
            whose rule would be applied on top of this one's, or whose hook finds nothing stored when SinglePass
            computes the relevance (Zennit's ``KeyError: 'grad_output'``).
        '''
        other = next((hook for hook in module_hooks(module) if hook is not self and hook.active), None)
        if other is not None:
            rule = type(getattr(other, 'rule', other)).__name__
            raise RuntimeError(
                f'SinglePass: module `{self.name}` ({type(module).__name__}) has the active hook of another Zennit '
                f'rule ({rule}) registered too, from a second composite on the same model (or a canonizer\'s rule for '
                'a module the composite gives a rule as well); the rules would be applied one on top of the other. '
                'Register one composite at a time: leave the other attributor\'s context, or call its composite\'s '
                'remove(), first.')

    def is_saved(self, tensor):
        '''Whether a backward node of this composite keeps a tensor in ``tensor``'s memory.'''
        return tensor.untyped_storage().data_ptr() in self.saved

    def forward(self, module, args, kwargs, output):
        '''Replace ``output`` by a copy whose backward pass computes the rule's relevance.

        Raises
        ------
        TypeError
            If the rule is Pass and the shapes differ.
        '''
        call = self.calls.pop() if self.calls else None
        if call is None:
            return None
        if call == FALLBACK:
            return self.zennit_forward(module, args, output)
        originals, kept, plan = call
        if not isinstance(output, torch.Tensor):
            # the module ran on a detached input: run it again under Zennit's hook
            self.fall_back(f'returns {type(output).__name__}, not a tensor')
            post_input = self.zennit_hook.pre_forward(module, originals)
            post_input = post_input if isinstance(post_input, tuple) else (post_input,)
            return self.zennit_forward(module, post_input, module.forward(*post_input, **kwargs))
        relevance_fn, saved, passed_on = self.relevance_function(module, kept, output, plan)
        for tensor in saved:
            self.saved[tensor.untyped_storage().data_ptr()] = tensor
        return RelevanceNode.apply(relevance_fn, (passed_on, *saved), *originals)

    def zennit_forward(self, module, args, output):
        '''What Zennit's forward hooks do with ``output``.'''
        output = self.zennit_hook.post_forward(module, args, output)
        self.zennit_hook.forward(module, args, output)
        return output

    def plan(self, module, args):
        '''How to compute a call with these inputs: one of ``'pass'``, ``'operands'`` (see :py:meth:`sums_operands`),
        ``'threshold'`` (see :py:func:`threshold_function`), ``'reused'`` (a plain convolution whose rule is the
        forward itself), ``'graph'`` (keep the module's graph), ``'conv'`` (a plain convolution) or ``'generic'``.'''
        if isinstance(self.rule, Pass):
            return PASS
        if self.sums_operands(module, args):
            return OPERANDS
        reuses = self.reuses_forward(module, args[0])
        if (type(module) is ThresholdReLU and reuses and type(self.rule) in (Epsilon, Norm)
                and self.normalize is not None):
            return THRESHOLD
        if is_plain_convolution(module):
            return REUSED if reuses and self.normalize is not None else CONV
        if reuses and not getattr(module, 'inplace', False):
            return GRAPH
        return GENERIC

    def relevance_function(self, module, inputs, output, plan):
        '''The function ``(grad_output, *saved) -> relevance of each input`` of the backward node, the cheapest exact
        way for this rule, module and call; the tensors ``saved`` it needs; and the tensor to pass on.'''
        rule, normalize = self.rule, self.normalize
        input = inputs[0]
        passed_on = output.detach()
        if plan == PASS:
            if input.shape != output.shape:
                raise TypeError(f'the Pass rule needs an output shaped like the input; {type(module).__name__} maps '
                                f'{tuple(input.shape)} to {tuple(output.shape)}')
            return (lambda grad_output: (grad_output,)), (), passed_on
        if plan == OPERANDS:
            return self.operands_function(module, inputs, output)
        if plan == THRESHOLD:
            return threshold_function(module), (
                passed_on + normalize.epsilon, input), passed_on
        if plan == REUSED:
            # the rule's forward is the forward itself: keep only the stabilised output (a new tensor, so in-place
            # operations after the module do not reach it)
            def reused_convolution(grad_output, denominator, input):
                input = input.detach()
                gradient = convolution_input_gradient(module, input, module.weight.detach(), grad_output / denominator)
                return (rule.reducer([input], [gradient]),)
            return reused_convolution, (stabilized(passed_on, normalize.epsilon), input), passed_on
        if plan in (GRAPH, REUSED):
            return self.graph_function(module, input, output)
        sign = self.input_sign if self.graph_holds(module) else UNKNOWN
        non_negative = None if sign == UNKNOWN else sign == NON_NEGATIVE
        if plan == CONV:
            cache = None if self.parameter_cache is None else self.parameter_cache.setdefault(module, {})
            return (lambda grad_output, input: (convolution_relevance(
                rule, module, input, grad_output, normalize, non_negative, cache),)), (input,), passed_on
        if type(rule) is ZPlus and is_affine_layer(module):
            return (lambda grad_output, input: (zplus_relevance(
                rule, module, input, grad_output, normalize, non_negative),)), (input,), passed_on
        return (lambda grad_output, input: (rule_relevance(rule, module, input, grad_output),)), (input,), passed_on

    def operands_function(self, module, inputs, output):
        '''The relevance function of :py:class:`~zennit_bnfuse.layers.AddOperands` (see :py:meth:`sums_operands`).'''
        rule, normalize = self.rule, self.normalize
        if normalize is not None:
            # nothing but the operands is kept: the backward step adds them again (see sum_relevance). A sum is -0.0
            # only where every operand is -0.0, so there the operands' relevance is 0 (times a finite number) whatever
            # the stabiliser's sign: copysign needs no ``+ 0.0`` first (one pass less than stabilized)
            def stabilize(total):
                return total.new_full((), normalize.epsilon).copysign(total).add_(total)
            return (lambda grad_output, *operands: sum_relevance(module, operands, grad_output, stabilize),
                    inputs, output.detach())

        def mapped(grad_output, output, *operands):
            normalised = rule.gradient_mapper(grad_output, [output])
            if isinstance(normalised, (list, tuple)):
                normalised, = normalised
            return operand_relevance([operand.detach() for operand in operands], normalised)
        return mapped, (output.detach().clone(), *inputs), output.detach()

    def graph_function(self, module, input, output):
        '''The relevance function for a rule that reuses the forward pass, differentiating the graph the module's
        forward left (kept for as long as autograd keeps this node's saved tensors, so retain_graph=True works as
        usual).'''
        rule, normalize = self.rule, self.normalize
        if output.grad_fn is None:
            # the module ran on a detached input (a plain convolution whose rule's output modifier is not the
            # identity): run it again, recording the graph
            input = input.detach().requires_grad_()
            with torch.enable_grad():
                output = module.forward(input)

        def reused(grad_output, output, input):
            grad_output = in_output_layout(grad_output, output)
            if normalize is None:
                normalised = rule.gradient_mapper(grad_output, [output])
            else:
                normalised = normalize(grad_output, output.detach())
            gradient, = torch.autograd.grad(output, input, grad_outputs=normalised, retain_graph=True)
            return (rule.reducer([input.detach()], [gradient]),)
        # the rule reads ``output`` later: pass on a copy, so in-place operations after the module (such as
        # ReLU(inplace=True)) leave it as it was
        return reused, (output, input), output.detach().clone()

    def reuses_forward(self, module, input):
        '''Whether the rule's single set of input, parameter and output modifiers is the identity for ``module``, so
        the module's own forward pass serves as the rule's.'''
        rule = self.rule
        return (isinstance(rule, BasicHook) and len(rule.input_modifiers) == 1
                and has_identity_params(rule.param_modifiers[0], module)
                and all_identity((*rule.input_modifiers, *rule.output_modifiers), input))


def in_output_layout(grad_output, output):
    '''``grad_output`` made contiguous where ``output`` is and it is not. A gradient handed back through a transpose
    and reshape may come with strides the output does not have, and torch's CPU BatchNorm backward returns a wrong
    input gradient for some of them (batch 1, strides (8, 1, 64, 8) for shape (1, 8, 8, 8), torch 2.14).'''
    if output.is_contiguous() and not grad_output.is_contiguous():
        return grad_output.contiguous()
    return grad_output


HOOK_METHODS = ('pre_forward', 'post_forward', 'forward', 'pre_backward', 'backward')


def computes_as(rule, base):
    '''Whether ``rule`` is a ``base`` (BasicHook or Pass) that computes as ``base`` does: it may bring its own
    modifiers, gradient mapper and reducer, but no hook method of its own.'''
    return isinstance(rule, base) and all(getattr(type(rule), name) is getattr(base, name) for name in HOOK_METHODS)


def single_pass_rule(rule, name=None, fallbacks=None, parameter_cache=None, saved=None):
    '''The hook computing ``rule`` in a single pass, or ``rule`` itself (None stays None) where it is not a
    :py:class:`zennit.core.BasicHook` or :py:class:`zennit.rules.Pass`, or overrides how they compute.'''
    if computes_as(rule, BasicHook) or computes_as(rule, Pass):
        return SinglePassHook(rule, name, fallbacks, parameter_cache=parameter_cache, saved=saved)
    return rule


def fallback_reason(rule):
    '''Why :py:func:`single_pass_rule` leaves ``rule`` to Zennit.'''
    for base in (BasicHook, Pass):
        if isinstance(rule, base):
            own = [name for name in HOOK_METHODS if getattr(type(rule), name) is not getattr(base, name)]
            return f'{type(rule).__name__} brings its own {", ".join(own)}'
    return f'{type(rule).__name__} is neither a BasicHook nor Pass'


# the input signs of each model SinglePass registered to, with what they were read from (see module_input_signs)
_SIGNS = weakref.WeakKeyDictionary()


def structure_key(module):
    '''A value that changes when ``module``'s traced graph or what the sign analysis reads could: its modules' types,
    attributes (flags such as ``inplace`` or torchvision's ``use_res_connect``, config objects; see
    :py:func:`~zennit_bnfuse.prepared.attribute_values`), forward overrides and hooks, and a GraphModule's code.'''
    key = [getattr(module, 'code', None)] if isinstance(module, torch.fx.GraphModule) else []
    for name, child in module.named_modules():
        key.append((name, type(child), vars(child).get('forward'), attribute_values(child), own_hooks(child),
                    own_hooks(child, pre=True)))
    return key


def module_input_signs(module, fixed=False):
    '''The sign of each module's input (by name) as the graph of ``module``'s forward says (see
    :py:mod:`zennit_bnfuse.signs`), why the graph says nothing, if it does not (else None), and the names of the
    modules whose input an op after them writes into in place (None if the graph says nothing).

    A GraphModule's own graph is used; other modules are traced with the tracer of
    :py:func:`zennit_bnfuse.graph.lrp_graph`. The result is kept until the module's structure changes
    (:py:func:`structure_key`), or, for a GraphModule that nobody changes but through its code (``fixed``), until its
    code changes.
    '''
    fixed = fixed and isinstance(module, torch.fx.GraphModule)
    key = module.code if fixed else structure_key(module)
    cached = _SIGNS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        if isinstance(module, torch.fx.GraphModule):
            graph = module.graph
        else:
            with tracing_copy(module) as traced:
                graph = trace_for_call(LRPTracer(), traced)  # leaves the random number generators as they were
    except Exception as error:  # fx raises many kinds of errors for untraceable code
        result = {}, f'the forward could not be traced ({type(error).__name__}: {str(error).splitlines()[0]})', None
    else:
        analysis = SignAnalysis(graph, module)
        result = analysis.module_inputs(), analysis.gave_up, inputs_written_after(graph, modules_of(module))
    _SIGNS[module] = (key, result)
    return result


class ModeWatch(ValueKeepingHook):
    '''Whether the traced graph of a model's forward holds for the module calls of this moment: they run inside the
    model's forward (a submodule called on its own gets other inputs), and every module is in the training mode it was
    in when SinglePass traced the forward (checked once per forward of the model: :py:meth:`enter` is a forward
    pre-hook on it, :py:meth:`leave` a forward hook).

    Attributes
    ----------
    holds: bool
        Whether a forward of the model is running and found the modes as traced.
    '''
    def __init__(self, model):
        self.modules = list(model.modules())
        self.modes = [module.training for module in self.modules]
        self.holds = False
        self.depth = 0  # forwards of the model running (a forward that calls the model again)

    def enter(self, model, args):
        '''Set :py:attr:`holds` for this forward.'''
        self.depth += 1
        self.holds = all(module.training == mode for module, mode in zip(self.modules, self.modes))

    def leave(self, model, args, output):
        '''The forward is over: module calls until the next one are outside it.'''
        self.depth -= 1
        self.holds = self.holds and self.depth > 0


class SinglePass(Composite):
    '''A composite with the rules and canonizers of ``composite``, each rule computed in a single pass.

    The relevance equals that of ``composite`` (see the module docstring for what is skipped, and the one
    difference, for modules called several times); use it wherever the composite would go, except where the relevance
    itself is differentiated (``create_graph=True``):

    >>> import torch
    >>> from zennit.attribution import Gradient
    >>> from zennit.composites import EpsilonPlusFlat
    >>> from zennit_bnfuse import FuseBatchNorm, SinglePass
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                             torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(4 * 4 * 4, 10)).eval()
    >>> input, target = torch.rand(1, 3, 8, 8), torch.eye(10)[[3]]
    >>> with Gradient(model, EpsilonPlusFlat(canonizers=[FuseBatchNorm()])) as attributor:
    ...     _, zennit = attributor(input, target)
    >>> with Gradient(model, SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()]))) as attributor:
    ...     _, single_pass = attributor(input, target)
    >>> torch.equal(zennit, single_pass)
    True

    Parameters
    ----------
    composite: :py:class:`zennit.core.Composite`
        The composite whose rule for each module (its ``module_map``) and canonizers are used; it is not changed,
        but its canonizer objects are shared, so do not register both at once.
    cache: bool, optional
        Keep what SinglePass derives from the model from one call to the next: each convolution's modified
        parameters (``W+`` for z+: as much memory as the parameters), computed again only when a parameter is
        replaced or changed in place, and the input signs, read again only when the graph module's code changes.
        Changes to parameters through ``tensor.data`` or to a graph module's submodules are not seen, so this is for
        models nobody changes that way (:py:class:`~zennit_bnfuse.CompositeLRP`'s prepared copy); False by default.

    Attributes
    ----------
    fallbacks: list[:py:class:`Fallback`]
        The modules whose rule Zennit's own hooks compute, with the reason: rules SinglePass does not compute (listed
        when the composite registers) and calls it does not compute (listed at the first such call). Emptied when
        the composite registers again.
    data_checked: list[str]
        The modules under ``ZPlus`` whose input sign the graph cannot tell, so that SinglePass reads it from the data
        (on a GPU, one synchronisation per call of each).
    sign_note: str or None
        Why the graph says nothing about signs (an untraceable forward, an in-place operation), if it does not.

    Raises
    ------
    TypeError
        If ``composite`` is not a Zennit composite.
    '''
    def __init__(self, composite, cache=False):
        check_composite(composite, 'SinglePass')
        self.composite = composite
        self.cache = cache
        self.parameter_cache = weakref.WeakKeyDictionary() if cache else None
        self.saved = weakref.WeakValueDictionary()
        self.fallbacks = []
        self.data_checked = []
        self.sign_note = None

        def module_map(ctx, name, module):
            rule = composite.module_map(ctx, name, module)
            hook = single_pass_rule(rule, name, self.fallbacks, self.parameter_cache, self.saved)
            if rule is not None and hook is rule:
                self.fallbacks.append(Fallback(name, rule, fallback_reason(rule)))
            return hook

        super().__init__(module_map=module_map, canonizers=composite.canonizers)

    def register(self, module):
        '''Apply the canonizers, read the input signs of the modules from the graph of ``module``'s forward (before
        any hook is registered: tracing runs the forward), and register a hook per module with a rule, as
        :py:meth:`zennit.core.Composite.register` does.

        A forward pass under the composite raises RuntimeError where a module has the active hook of another Zennit
        composite too (see :py:meth:`SinglePassHook.refuse_other_rules`), and ``create_graph=True`` raises
        RuntimeError in the backward pass (the relevance cannot be differentiated again).

        Raises
        ------
        TypeError
            If ``module`` is not a torch.nn.Module or holds a TorchScript module, whose compiled forward runs no hooks
            (pass the original module), or a wrapper (see :py:func:`~zennit_bnfuse.checks.check_model`).
        ValueError
            If a lazy module of ``module`` has not run yet, or a parameter is on the meta device.
        '''
        check_model(module, 'SinglePass')
        self.remove()
        self.fallbacks.clear()
        try:
            for canonizer in self.canonizers:
                self.handles += canonizer.apply(module)
            self.register_hooks(module)
        except BaseException:
            # a canonizer or the composite's module_map raised: the model gets its modules back, without hooks
            self.remove()
            raise

    def register_hooks(self, module):
        '''Read the input signs from the graph of ``module``'s forward and register a hook per module with a rule
        (see :py:meth:`register`).'''
        signs, self.sign_note, written = module_input_signs(module, fixed=self.cache)
        self.data_checked = []
        mode_watch = ModeWatch(module)
        # first among the model's pre-hooks and last among its forward hooks: a rule on the model itself reads what
        # it found
        self.handles.append(module.register_forward_pre_hook(mode_watch.enter, prepend=True))
        ctx = {}
        for name, child in module.named_modules():
            template = self.module_map(ctx, name, child)
            if template is None:
                continue
            hook = template.copy()
            if isinstance(hook, SinglePassHook):
                hook.input_sign = signs.get(name, UNKNOWN)
                hook.copies_input = written is None or name in written
                hook.mode_watch = mode_watch
                if hook.input_sign == UNKNOWN and type(hook.rule) is ZPlus and is_affine_layer(child):
                    self.data_checked.append(name)
            self.hook_refs.add(hook)
            self.handles.append(hook.register(child))
        self.handles.append(module.register_forward_hook(mode_watch.leave, always_call=True))
