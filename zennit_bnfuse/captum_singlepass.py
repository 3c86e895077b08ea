'''Captum's LRP rules computed in one forward pass and one backward step per layer.

Captum's :py:class:`captum.attr.LRP` runs the model twice: a first forward pass records every layer's input and
changes the layer's weights as its rule says (``_manipulate_weights``); a second forward pass, on the changed weights
with each layer's input reset to the recorded one, carries the hooks that turn the gradient into relevance: on each
layer's output ``grad / (z + sign(z) * epsilon)``, on each layer's input ``grad * input`` (registered once per tensor,
by the first layer that reads it), and on each activation's input a hook that replaces the gradient arriving there by
the relevance of the activation's output. :py:class:`CaptumSinglePass` computes the same relevance from one forward
pass, with the same hooks on the same tensors:

- layers whose rule leaves the weights alone (``EpsilonRule``, ``IdentityRule``) keep the forward pass's own graph,
  and their output and input hooks are registered on it, as Captum registers them in its second pass;
- layers whose rule changes the weights (``GammaRule``, ``Alpha1_Beta0_Rule``, user rules) run on a detached input
  and get one custom backward node that computes the layer's output under the changed weights (with the rule's own
  ``_manipulate_weights`` on a copy of the layer) and its input gradient (one ``aten.convolution_backward`` call for
  plain convolutions); the input hooks do the rest, as in Captum;
- activations and other layers without a rule run on a detached input; their input's hook hands on the relevance of
  their output;
- ``EpsilonRule`` on a plain convolution or an ``Addition_Module`` whose inputs only such layers read (in a traced
  model, see :py:func:`in_node_layers`) is computed in the layer's own backward node instead of by hooks: the output
  hook's quotient, the input gradient and the input hook's product, the same operations on the same tensors, without
  the layer's graph and in tensors of the node's own. The clones that give each such layer its own input tensor (so
  that Captum's hooks on it see its share only) are left out of the forward pass: the shares add up as the clones'
  gradients would.

The stabiliser of Captum's ``EpsilonRule``, ``GammaRule`` and ``Alpha1_Beta0_Rule`` is computed in fewer passes, bit
for bit, and their hooks do not keep each layer's relevance in the rule's ``relevance_input`` and ``relevance_output``
(Captum keeps them for ``LayerLRP``; here nobody reads them, and keeping them would hold every layer's relevance until
the end of the call); other rules' (``IdentityRule``, user rules) output and input hooks are their own Captum methods.

What one forward pass cannot reproduce: in Captum's second pass the tensors between layers carry the outputs of the
changed weights, so a functional operation whose gradient depends on its input's values (``F.relu``, ``x * y``, ...)
reads values the first pass never computed. Where the traced graph shows such an operation downstream of a layer
whose rule changes weights, or where a rule changes Captum's two-pass procedure itself (its own ``forward_hook``),
the whole model runs on Captum's own hooks instead, and :py:attr:`CaptumSinglePass.fallback` says why.
'''
import copy
import functools
import operator
import weakref
from collections import defaultdict

import torch
import torch.fx
import torch.nn.functional as F
import torchvision.ops
from captum._utils.common import _run_forward
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, PropagationRule

from .aliasing import reads_metadata
from .graph import blocks_kept_whole, carry_forward_hooks
from .graph_layers import scale_passing_relevance
from .signs import own_hooks
from .singlepass import (
    Fallback, RelevanceNode, convolution_input_gradient, in_output_layout, is_plain_convolution, stabilized,
    sum_relevance,
)

# Captum's rules whose output and input hooks this module computes itself (the stabiliser in three passes)
KNOWN_RULES = (EpsilonRule, GammaRule, Alpha1_Beta0_Rule)
# Captum's rules; IdentityRule's hooks are its own methods
CAPTUM_RULES = (*KNOWN_RULES, IdentityRule)
# the methods that make Captum's two-pass procedure; a rule that brings its own cannot run in one pass
PROCEDURE_METHODS = ('forward_hook', 'forward_hook_weights', 'forward_pre_hook_activations', 'backward_hook_activation')
# functions and methods whose gradient does not depend on the values of their tensor inputs
LINEAR_FUNCTIONS = {
    torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, torch.mean, torch.sum, torch.broadcast_tensors, operator.getitem, operator.add,
    operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos, torch.add, torch.sub, torch.neg,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.pad, F.dropout, torchvision.ops.stochastic_depth,
    # the relevance passes to the signal unchanged, none to the factor, whatever their values
    scale_passing_relevance,
}
LINEAR_METHODS = {
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'permute', 'transpose', 't', 'squeeze',
    'unsqueeze', 'expand', 'expand_as', 'contiguous', 'clone', 'mean', 'sum', 'narrow', 'select', 'chunk', 'split',
    'unbind', 'movedim', 'add', 'sub', 'neg', 'to', 'float', 'double', 'half', 'bfloat16', 'type_as',
    'size', 'dim', 'numel',
}
# products and quotients are linear in an input-dependent operand when the other one is not input-dependent
SCALING_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div, 'mul',
                     'div'}


def called_layers(model):
    '''The layers Captum's LRP puts rules on, by name: for a GraphModule, the modules its forward calls (in the order
    of their first call; for a block timm marks untraceable, which the trace keeps whole, its leaf modules), else
    every leaf module.'''
    if not isinstance(model, torch.fx.GraphModule):
        return leaf_modules(model)
    blocks, layers = set(blocks_kept_whole(model)), {}
    for node in model.graph.nodes:
        if node.op == 'call_module' and node.target not in layers:
            module = model.get_submodule(node.target)
            layers.update(leaf_modules(module, node.target) if node.target in blocks else [(node.target, module)])
    return list(layers.items())


def leaf_modules(module, prefix=''):
    '''``(name, module)`` for every module in ``module`` without children, named as in the model whose submodule
    ``prefix`` it is.'''
    return [(name, child) for name, child in module.named_modules(prefix=prefix) if not list(child.children())]


def own_methods(rule, names):
    '''The methods among ``names`` that ``rule``'s class defines differently from Captum's PropagationRule.'''
    return [name for name in names if getattr(type(rule), name) is not getattr(PropagationRule, name)]


def changes_weights(rule):
    '''Whether ``rule`` may make the layer compute something else than its forward pass (it has its own
    ``_manipulate_weights``; Captum's ``EpsilonRule`` and ``IdentityRule`` do not).'''
    return type(rule)._manipulate_weights is not EpsilonRule._manipulate_weights


def input_dependent(node, dependent):
    '''Whether an argument of a node is (or holds) a node that depends on the model's inputs.'''
    if isinstance(node, torch.fx.Node):
        return node in dependent
    if isinstance(node, (list, tuple)):
        return any(input_dependent(item, dependent) for item in node)
    return False


def gradient_reads_values(node, dependent):
    '''Whether the gradient of a ``call_function``/``call_method`` node depends on the values of its inputs.'''
    target = node.target
    if target in LINEAR_FUNCTIONS or target in LINEAR_METHODS:
        return False
    if target in SCALING_FUNCTIONS:
        return sum(input_dependent(arg, dependent) for arg in node.args[:2]) > 1 or (
            target in (operator.truediv, operator.itruediv, torch.div, 'div')
            and len(node.args) > 1 and input_dependent(node.args[1], dependent))
    return True


def changed_values_read(graph, rules):
    '''Why one forward pass cannot reproduce Captum's second pass on ``graph`` (see the module docstring), or None.

    Parameters
    ----------
    graph: :py:class:`torch.fx.Graph`
    rules: dict[str, object]
        The rule (or None) of each module the graph calls, by name.
    '''
    dependent, changed = set(), {}  # changed: node -> the layer whose changed weights its second-pass value reflects
    for node in graph.nodes:
        if reads_metadata(node):  # a shape or dtype is the same in both passes and has no gradient
            continue
        inputs = node.all_input_nodes
        if node.op == 'placeholder' or any(other in dependent for other in inputs):
            dependent.add(node)
        sources = [changed[other] for other in inputs if other in changed]
        if node.op == 'call_module':
            rule = rules.get(node.target)
            if rule is not None and changes_weights(rule):
                changed[node] = node.target
            elif rule is None and sources:
                changed[node] = sources[0]
        elif node.op in ('call_function', 'call_method') and sources:
            if node in dependent and gradient_reads_values(node, dependent):
                return (f'`{node.name}` ({getattr(node.target, "__name__", node.target)}) has a gradient that '
                        f'depends on its input, which Captum\'s second pass computes with the changed weights of '
                        f'`{sources[0]}`')
            changed[node] = sources[0]
    return None


def computed_in_node(rule, module):
    '''Whether the single-pass engine can compute ``rule`` for ``module`` in the layer's own backward node: Captum's
    ``EpsilonRule`` (exactly; subclasses may change its hooks) on a plain convolution (see
    :py:func:`~zennit_bnfuse.singlepass.is_plain_convolution`) or on Captum's ``Addition_Module``.'''
    if type(rule) is not EpsilonRule:
        return False
    if isinstance(module, Addition_Module):
        return type(module).forward is Addition_Module.forward and 'forward' not in vars(module)
    return is_plain_convolution(module)


def in_node_layers(graph, rules, modules):
    '''The layers (names) whose relevance the single-pass engine computes in their own backward node, and the clone
    nodes (names) left out of the forward pass.

    A layer's backward node hands its input the layer's relevance, where Captum's input hook would multiply whatever
    gradient reaches the input tensor: the two agree where every op that reads the tensor is such a layer. The graph
    rewrite for Captum gives each module call its own clone of a tensor that several ops read; a clone whose source
    is read only by such clones and such layers is left out, so the layers share the source and their shares add up.

    Parameters
    ----------
    graph: :py:class:`torch.fx.Graph`
    rules: dict[str, object]
        The rule (or None) of each module the graph calls, by name.
    modules: dict[str, :py:obj:`torch.nn.Module`]

    Returns
    -------
    tuple[set[str], set[str]]
    '''
    chosen = {node for node in graph.nodes if node.op == 'call_module' and rules.get(node.target) is not None
              and computed_in_node(rules[node.target], modules[node.target]) and not node.kwargs
              and len(node.args) == (2 if isinstance(modules[node.target], Addition_Module) else 1)
              and all(isinstance(arg, torch.fx.Node) for arg in node.args)}

    def readers(node):  # readers of a shape or dtype get no gradient
        return [user for user in node.users if not reads_metadata(user)]

    changed = True
    while changed:
        # a layer whose input another op reads keeps Captum's hooks; that may leave a tensor of another layer shared
        changed = False
        for node in list(chosen):
            if any(user not in chosen for input in node.all_input_nodes for user in readers(input)):
                chosen.discard(node)
                changed = True

    def is_clone(node):
        return node.op == 'call_method' and node.target == 'clone' and len(node.args) == 1 and not node.kwargs

    left_out = set()
    for node in graph.nodes:
        tensor_readers = readers(node)
        if len(tensor_readers) > 1 and all(
                reader in chosen or (is_clone(reader) and all(user in chosen for user in readers(reader)))
                for reader in tensor_readers):
            left_out.update(reader.name for reader in tensor_readers if is_clone(reader))
    return {node.target for node in chosen}, left_out


# the forward pass without the left-out clones, by model (see without_clones)
_FORWARDS = weakref.WeakKeyDictionary()


def without_clones(model, left_out):
    '''A GraphModule computing ``model``'s forward (a GraphModule) without the clone nodes ``left_out``, sharing its
    modules; kept for the next call while ``model``'s code, modules and tensors are the same objects.'''
    if not left_out:
        return model
    # the copy refers to the modules and tensors the graph names: replacing one must build it again
    key = (model.code, frozenset(left_out), tuple((name, id(module)) for name, module in model.named_modules()),
           tuple(id(tensor) for tensor in (*model.parameters(), *model.buffers())))
    cached = _FORWARDS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(model.graph, {}))
    for node in list(graph.nodes):
        if node.name in left_out:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    forward = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    carry_forward_hooks(model, forward)
    _FORWARDS[model] = (key, forward)
    return forward


def changed_layer(rule, module, inputs, output):
    '''A shallow copy of ``module`` with its own copies of its parameters and no hooks, whose weights
    ``rule._manipulate_weights`` changed, as Captum changes the layer's after its first forward pass.'''
    shadow = copy.copy(module)
    shadow._parameters = type(module._parameters)(
        (name, None if parameter is None else torch.nn.Parameter(parameter.detach().clone(), parameter.requires_grad))
        for name, parameter in module._parameters.items())
    for key, value in vars(module).items():
        if key.endswith('hooks') and isinstance(value, dict):
            setattr(shadow, key, type(value)())
    rule._manipulate_weights(shadow, inputs, output)
    return shadow


class Released:
    '''A function that its engine empties when its call ends (see :py:meth:`CaptumSinglePass.released_after_call`).'''
    __slots__ = ('function',)

    def __init__(self, function):
        self.function = function

    def __call__(self, *arguments):
        return self.function(*arguments)


class RuleHooks:
    '''The one-pass hooks for one layer and its Captum rule (None: relevance passes through unchanged).

    Parameters
    ----------
    engine: :py:class:`CaptumSinglePass`
    name: str
    rule: :py:class:`captum.attr._utils.lrp_rules.PropagationRule` or None
    '''
    def __init__(self, engine, name, rule):
        self.engine = engine
        self.name = name
        self.rule = rule
        self.calls = []
        if rule is not None:
            # Captum gives each layer's rule its own relevance dicts before the call
            rule.relevance_input = defaultdict(list)
            rule.relevance_output = {}

    def register(self, module):
        '''The forward pre-hook and forward hook on ``module``; returns their handles.'''
        return [module.register_forward_pre_hook(self.pre_forward), module.register_forward_hook(self.forward)]

    def pre_forward(self, module, args):
        '''Keep the inputs; a layer whose graph is not kept runs on detached inputs. A layer without a rule replaces
        the gradient of its input by the relevance of its output, as Captum's activation hook does (registered on the
        input tensor now, so it comes before the input hooks of the layers that read the tensor later).

        Raises
        ------
        TypeError
            If a layer without a rule is called with other than one tensor.
        '''
        cell = None
        if self.rule is None:
            if len(args) != 1 or not isinstance(args[0], torch.Tensor):
                raise TypeError(f'Module `{self.name}` ({type(module).__name__}) has no rule and is called with '
                                f'{len(args)} inputs; relevance can pass through a layer with one input only; give it '
                                'a rule.')
            cell = []  # the relevance of this call's output, once the backward pass has reached it
            if args[0].requires_grad:
                args[0].register_hook(lambda grad: cell[0] if cell else None)
        self.calls.append((args, cell))
        if self.rule is not None and not changes_weights(self.rule) and self.name not in self.engine.in_node:
            return None
        return tuple(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args)

    def forward(self, module, args, output):
        '''Register the rule's hooks (or the pass-through node) and return the output that carries them.

        Raises
        ------
        TypeError
            If the layer returns other than one tensor, relevance would pass through a layer that changes shape, or a
            layer whose relevance is computed in its node gets an input that is not a tensor.
        '''
        inputs, cell = self.calls.pop()
        if not isinstance(output, torch.Tensor):
            raise TypeError(f'Module `{self.name}` ({type(module).__name__}) returns {type(output).__name__}; LRP '
                            'needs layers that return one tensor.')
        if self.rule is None:
            input, = inputs
            if input.shape != output.shape:
                raise TypeError(
                    f'Module `{self.name}` ({type(module).__name__}) changes the shape of its input, so relevance '
                    'cannot pass through it unchanged; give it a rule instead of None.')
            if not input.requires_grad:
                return output
            # the input's hook hands on this relevance (in place of everything that reaches the input)
            return RelevanceNode.apply(self.engine.released_after_call(
                lambda grad_output: (cell.append(grad_output) or grad_output,)), (output.detach(),), input)
        rule = self.rule
        rule._has_single_input = len(inputs) == 1
        if self.name in self.engine.in_node:
            if not all(isinstance(input, torch.Tensor) for input in inputs):
                raise TypeError(f'Module `{self.name}` ({type(module).__name__}) is called with an input that is not a '
                                'tensor; its rule needs a tensor for each input (as in Captum).')
            if not any(input.requires_grad for input in inputs):
                return output
            relevance_fn, saved = self.in_node_relevance(module, inputs, output)
            return RelevanceNode.apply(self.engine.released_after_call(relevance_fn), (output.detach(), *saved),
                                       *inputs)
        for input in inputs:
            if isinstance(input, torch.Tensor) and input.requires_grad:
                self.engine.register_input_hook(input, rule)
        if not changes_weights(rule):
            if not output.requires_grad:
                return output
            # the output hook sits on a node of its own, after the input hooks that the next layers register on the
            # tensor this returns (Captum's clone of the output does the same)
            detached = output.detach()  # the closure must not hold the output's graph
            hook = self.output_hook(detached)
            return RelevanceNode.apply(self.engine.released_after_call(
                lambda grad_output: (hook(in_output_layout(grad_output, detached)),)), (detached,), output)
        tensors = [input for input in inputs if isinstance(input, torch.Tensor)]
        if not any(input.requires_grad for input in tensors):
            return output
        # the weights change as in Captum's first pass: after the layer's own forward, from its input and output
        changed = changed_layer(rule, module, tuple(input.detach() for input in inputs), output.detach())
        return RelevanceNode.apply(self.engine.released_after_call(self.changed_gradient(changed)),
                                   (output.detach(), *tensors), *tensors)

    def in_node_relevance(self, module, inputs, output):
        '''For a layer of :py:func:`in_node_layers`: the function ``(grad_output, *saved) -> relevance of each
        input`` and the tensors ``saved`` it needs. It runs what Captum's hooks run, in the same order on the same
        tensors: the output hook's quotient (into the stabilised output), the layer's input gradient, the input hook's
        product (into the gradient). The engine's single backward pass lets the node overwrite what it saved.'''
        epsilon = self.rule.STABILITY_FACTOR
        if isinstance(module, Addition_Module):
            # autograd sums a broadcast operand's gradient back before the input hook multiplies
            return (lambda grad_output, *operands: sum_relevance(
                module, operands, grad_output, functools.partial(stabilized, epsilon=epsilon), sum_first=True)), inputs

        def convolution_relevance(grad_output, denominator, input):
            input = input.detach()
            normalised = torch.div(grad_output, denominator, out=denominator)
            return (convolution_input_gradient(module, input, module.weight.detach(), normalised).mul_(input),)
        return convolution_relevance, (stabilized(output, epsilon), *inputs)

    def output_hook(self, output):
        '''Captum's output hook for ``output`` (the layer's output under the rule's weights): the gradient divided by
        the stabilised output.'''
        if type(self.rule) in KNOWN_RULES:
            denominator = stabilized(output, self.rule.STABILITY_FACTOR)
            return lambda grad: grad / denominator
        return self.rule._create_backward_hook_output(output)

    def changed_gradient(self, changed):
        '''The function ``(grad_output, *inputs) -> gradient of each input`` of a layer whose rule changed its weights:
        Captum's output hook on the changed layer's output, then the changed layer's input gradient.'''
        def gradient(grad_output, *inputs):
            inputs = [input.detach() for input in inputs]
            if len(inputs) == 1 and is_plain_convolution(changed) and type(self.rule) in KNOWN_RULES:
                input, = inputs
                with torch.no_grad():
                    output = changed(input)
                normalised = self.output_hook(output)(grad_output)
                return (convolution_input_gradient(changed, input, changed.weight.detach(), normalised),)
            inputs = [input.requires_grad_() for input in inputs]
            with torch.enable_grad():
                output = changed(*inputs)
            normalised = self.output_hook(output.detach())(in_output_layout(grad_output, output))
            return torch.autograd.grad(output, inputs, grad_outputs=normalised, allow_unused=True)
        return gradient


class CaptumSinglePass:
    '''Captum's LRP on ``model`` with one forward pass (see the module docstring).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (a prepared copy, whose in-place modules the rewrite made out of place where it could; a module
        left in place sends the whole model to Captum's own hooks, which change the layers' weights for the duration
        of a call).
    choose_rule: callable
        ``(name, module) -> rule or None``, a new rule per call, as :py:class:`zennit_bnfuse.FusedLRP` gives them.
    autograd_types: tuple[type], optional
        Layers without a rule that autograd differentiates as usual (reshapes), instead of passing relevance.

    Attributes
    ----------
    rules: dict[str, object]
        The rule of each layer, by name.
    fallback: :py:class:`~zennit_bnfuse.singlepass.Fallback` or None
        Why the whole model must run on Captum's own hooks, or None.
    fallbacks: list[:py:class:`~zennit_bnfuse.singlepass.Fallback`]
        ``[fallback]`` if there is one; else the layers whose rule this module does not reproduce, whose own Captum
        methods (weight change, output and input hooks) run in the single pass.
    in_node: set[str]
        The layers whose relevance is computed in their own backward node (see :py:func:`in_node_layers`; none for
        a model that is not a GraphModule).
    forward_model: :py:obj:`torch.nn.Module`
        What the forward pass runs: ``model``, or a GraphModule sharing its modules without the clones
        :py:func:`in_node_layers` leaves out.
    '''
    def __init__(self, model, choose_rule, autograd_types=()):
        self.model = model
        self.autograd_types = autograd_types
        self.layers = called_layers(model)
        self.rules = {name: choose_rule(name, module) for name, module in self.layers}
        self.fallback = self.whole_model_fallback()
        if self.fallback is not None:
            self.fallbacks = [self.fallback]
        else:
            self.fallbacks = [
                Fallback(name, rule, f'{type(rule).__name__} is not one of Captum\'s rules this engine reproduces; '
                                     'its own Captum methods run in the single pass')
                for name, rule in self.rules.items() if rule is not None and type(rule) not in CAPTUM_RULES]
        self.in_node, self.forward_model = set(), model
        if self.fallback is None and isinstance(model, torch.fx.GraphModule):
            self.in_node, left_out = in_node_layers(model.graph, self.rules, dict(self.layers))
            self.forward_model = without_clones(model, left_out)
        self._registered, self._released = {}, []

    def whole_model_fallback(self):
        '''Why the model must run on Captum's own hooks, or None.'''
        writing = next((name for name, module in self.layers if getattr(module, 'inplace', None) is True), None)
        if writing is not None:
            # the rewrite of a traced copy made every in-place module it could out of place (zennit_bnfuse.graph)
            why = ('which the forward reads again through other tensors' if isinstance(self.model, torch.fx.GraphModule)
                   else 'and the forward could not be traced to tell whether it reads the write again')
            return Fallback(writing, self.rules[writing], f'writes in place into its input, {why}; every layer runs '
                                                          'on Captum\'s hooks')
        hooked = next((name for name, module in self.layers if own_hooks(module)), None)
        if hooked is not None:
            return Fallback(hooked, self.rules[hooked], 'has a forward hook of its own, which may change the output '
                                                        'that the rule\'s relevance is computed from; every layer runs '
                                                        'on Captum\'s hooks')
        for name, rule in self.rules.items():
            if rule is not None and own_methods(rule, PROCEDURE_METHODS):
                return Fallback(name, rule, f'{type(rule).__name__} brings its own '
                                            f'{", ".join(own_methods(rule, PROCEDURE_METHODS))}, which make Captum\'s '
                                            'two passes; every layer runs on Captum\'s hooks')
        changing = [name for name, rule in self.rules.items() if rule is not None and changes_weights(rule)]
        if not changing:
            return None  # both of Captum's passes compute the same values
        if len(self.layers) == 1 and self.layers[0][1] is self.model:
            return None  # a model that is one layer: nothing runs after it
        if not isinstance(self.model, torch.fx.GraphModule):
            return Fallback(changing[0], self.rules[changing[0]],
                            'the forward could not be traced, so the functional operations after layers whose rule '
                            'changes weights are unknown; every layer runs on Captum\'s hooks')
        reason = changed_values_read(self.model.graph, self.rules)
        if reason is not None:
            return Fallback(None, None, reason + '; every layer runs on Captum\'s hooks')
        return None

    def released_after_call(self, function):
        '''``function`` behind a :py:class:`Released` that :py:meth:`attribute` empties when the call ends: the
        call's autograd nodes keep it, and without it they keep this engine and its model (a prepared copy) alive
        until a second pass of Python's garbage collector, one copy per rebuild.'''
        released = Released(function)
        self._released.append(released)
        return released

    def register_input_hook(self, input, rule):
        '''Captum's input hook of ``rule`` on ``input``, unless a layer registered one on this tensor before.'''
        if id(input) in self._registered:
            return
        self._registered[id(input)] = input  # kept alive, so the id is not reused during the call
        data = input.detach()
        if type(rule) in KNOWN_RULES:
            def hook(grad):
                return grad * data
        else:
            hook = rule._create_backward_hook_input(data)
        input.register_hook(hook)

    def attribute(self, inputs, target=None, additional_forward_args=None, verbose=False):
        '''The relevance of ``inputs`` (a tuple of tensors) for ``target``, and the target outputs: what
        :py:meth:`captum.attr.LRP.attribute` computes.

        Returns
        -------
        tuple[tuple[:py:obj:`torch.Tensor`, ...], :py:obj:`torch.Tensor`]
            The relevance of each input (scaled by the target output, as Captum does) and the target output per
            example.

        Raises
        ------
        RuntimeError
            If the model calls a layer more than once (as Captum does).
        '''
        handles, calls = [], defaultdict(int)
        self._registered, self._released = {}, []
        try:
            for name, module in self.layers:
                rule = self.rules[name]
                if rule is None and isinstance(module, self.autograd_types):
                    continue  # plain autograd reshapes the relevance
                if rule is not None:
                    handles.append(module.register_forward_pre_hook(self.counter(name, module, calls)))
                handles += RuleHooks(self, name, rule).register(module)
                if verbose and rule is not None:
                    print(f'Applied {rule} on layer {module}')
            with torch.enable_grad():
                adjusted = tuple(input + 0 if input is not None else input for input in inputs)
                output = _run_forward(self.forward_model, adjusted, target, additional_forward_args)
                assert output[0].numel() == 1, ('Target not provided when necessary, cannot take gradient with '
                                                'respect to multiple outputs.')
                gradients = torch.autograd.grad(torch.unbind(output), inputs)
        finally:
            for handle in handles:
                handle.remove()
            for released in self._released:  # the backward pass has run (without retain_graph: it cannot again)
                released.function = None
            self._registered, self._released = {}, []
        output = output.detach()
        relevance = tuple(gradient * output.reshape((-1,) + (1,) * (gradient.dim() - 1)) for gradient in gradients)
        return relevance, output

    @staticmethod
    def counter(name, module, calls):
        '''A pre-hook raising Captum's error for a layer called a second time.'''
        def count(layer, args):
            calls[name] += 1
            if calls[name] > 1:
                raise RuntimeError(f'Module {module} is being used more than once in the network, which is not '
                                   'supported by LRP. Please ensure that module is being used only once in the '
                                   'network.')
        return count
