'''Checking folds on example inputs the user passes.

A fold found in the traced forward graph is exact by construction, except that a fold into a Linear, and into a
convolution called on an unbatched input, is exact only for some input ranks (see
:py:class:`~zennit_bnfuse.layers.FoldedLayerMixin`); on example inputs, the folds whose layer gets another rank are
found and left unfused. Where the forward cannot be traced, the folds found between neighbours inside an
``nn.Sequential`` are only candidates: the forward may slice the Sequential or call its children in another order.
Each candidate is kept only if the model with it folded gives the model's own output on the example inputs.
'''
import copy
import dataclasses
from typing import NamedTuple

import torch

from .fold import is_batch_norm
from .layers import FoldedInputError
from .replacements import model_copy, replaced_copy, replacement_modules
from .report import FusionReport, UnfusedBatchNorm


def as_input_tuple(example_inputs):
    '''``example_inputs`` as the tuple of positional arguments of the model's forward.

    Raises
    ------
    TypeError
        If it is neither a tensor nor a tuple or list of forward arguments.
    '''
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(f'example_inputs must be a tensor, or a tuple of the forward\'s positional arguments, not '
                    f'{example_inputs!r}.')


def describe_inputs(inputs):
    '''The shapes and dtypes of the tensors in ``inputs``, in words.'''
    return ', '.join(f'{tuple(value.shape)} {value.dtype}' if isinstance(value, torch.Tensor) else type(value).__name__
                     for value in inputs)


def seeded_output(model, arguments, seed=0):
    '''``model(*arguments)`` without gradients, as the same call on the same model gives it every time: on clones of
    the tensor arguments (a forward may change its input in place) and copies of the others (a forward may fill a
    list it is given; an argument that cannot be copied is given as it is), and with the random number generators
    seeded with ``seed`` (a forward may draw random numbers; folds do not change how many), their state restored
    after.'''
    tensors = [value for value in (*arguments, *model.parameters(), *model.buffers()) if torch.is_tensor(value)]
    devices = sorted({tensor.device.index or 0 for tensor in tensors if tensor.device.type == 'cuda'})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model(*(value.clone() if torch.is_tensor(value) else copied(value) for value in arguments))


def copied(value):
    '''A deep copy of ``value`` (its tensors cloned), or ``value`` itself where it cannot be copied.'''
    try:
        return copy.deepcopy(value)
    except Exception:  # objects may refuse to be copied in many ways
        return value


def output_tensors(output):
    '''The tensors in a model output (a tensor, or tuples, lists, dicts and dataclasses of them), in a fixed
    order.'''
    if isinstance(output, torch.Tensor):
        return [output]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = [getattr(output, field.name) for field in dataclasses.fields(output)]
    if isinstance(output, dict):
        output = [output[key] for key in sorted(output, key=str)]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in output_tensors(item)]
    return []


def output_dtype(output):
    '''The dtype of the first floating-point tensor in a model output (float32 where it holds none).'''
    return next((tensor.dtype for tensor in output_tensors(output) if tensor.is_floating_point()), torch.float32)


def output_tolerance(dtype):
    '''How far (relative to the largest output value) a model with folds done may be from the model in ``dtype``:
    the square root of its epsilon, far above the folds' rounding and far below a wrong fold.'''
    return torch.finfo(dtype).eps ** .5


def output_differences(actual, expected, scales=None):
    '''``(relative error, dtype)`` for each tensor of two model outputs: the largest absolute difference relative to
    the scale of the expected values, and the expected tensor's dtype; an infinite error where their structure,
    shapes or non-finite entries differ.

    The scale is that of each value where ``scales`` gives it (see :py:func:`value_scales`: a small value beside large
    ones in the same tensor is measured on its own size, unless it is small by cancelling), otherwise the largest
    absolute expected value of the tensor (a small auxiliary output is still compared on its own scale, not on that of
    the logits beside it). Complex values are compared by their modulus.

    Parameters
    ----------
    actual, expected: object
        Model outputs (see :py:func:`output_tensors`).
    scales: list[:py:class:`ValueScale` or None] or None
        For each tensor of ``expected``, the scales of its values, or None.
    '''
    actual, expected = output_tensors(actual), output_tensors(expected)
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return [(float('inf'), output_dtype(expected))]
    differences = []
    for a, e, scale in zip(actual, expected, scales or [None] * len(expected)):
        dtype = e.dtype
        a, e = (tensor.to(torch.complex128 if tensor.is_complex() else torch.float64) for tensor in (a, e))
        finite = torch.isfinite(e)
        if not torch.equal(finite, torch.isfinite(a)) or not torch.allclose(a[~finite], e[~finite], equal_nan=True):
            differences.append((float('inf'), dtype))
        elif not finite.any():
            differences.append((0., dtype))
        elif scale is None:
            difference = (a - e)[finite].abs().max().item()
            largest = e[finite].abs().max().item()
            differences.append((difference / largest if largest else difference, dtype))
        else:
            difference, scale = (a - e)[finite].abs(), scale.scale[finite]
            relative = torch.where(scale > 0, difference / scale, difference)
            differences.append((relative.max().item(), dtype))
    return differences


def output_difference(actual, expected, index):
    '''The largest absolute difference between tensor ``index`` of two model outputs of the same structure.'''
    a, e = output_tensors(actual)[index], output_tensors(expected)[index]
    return (a.to(e.dtype) - e).abs().max().item()


def output_mismatch(actual, expected, scales=None):
    '''None where each tensor of the output ``actual`` agrees with that of ``expected`` to within the tolerance of
    its dtype (:py:func:`output_tolerance`, relative to the scale :py:func:`output_differences` takes with
    ``scales``; exactly for integer and bool tensors), else which tensor does not and by how much, in words.'''
    differences = output_differences(actual, expected, scales)
    for index, (error, dtype) in enumerate(differences):
        allowed = output_tolerance(dtype) if dtype.is_floating_point or dtype.is_complex else 0.
        if not error <= allowed:
            which = 'the model output' if len(differences) == 1 else (
                f'tensor {index + 1} of the {len(differences)} in the model output')
            scale = scales[index] if scales else None
            message = (f'{which} differs by {error:.3g} relative to '
                       f'{"its largest value" if scale is None else "the scale of its values"} ({dtype}, allowed '
                       f'{allowed:.1g})')
            if scale is not None and scale.cancels and output_difference(actual, expected, index) <= scale.rounding:
                message += (f'; its values are at most {scale.relative_size:.1g} of the values they are computed '
                            'from (they cancel), so the rounding of an exact fold can show as much: pass example '
                            'inputs on which the output does not cancel')
            return message
    return None


# the relative size of the perturbation :py:func:`perturbation_hooks` adds to every leaf module's outputs
PERTURBATION = 1e-6
# how many float64 epsilons of what an output value is computed from a fold's rounding may change it by: 28 times the
# most (356) that exact folds of six torchvision models took (benchmarks/results/fold-check-rounding.md)
ROUNDING_ALLOWANCE = 1e4


class ValueScale(NamedTuple):
    '''The scales :py:func:`output_differences` compares an output tensor's values on (see
    :py:func:`value_scales`).'''
    scale: torch.Tensor
    #: the tensor's largest absolute value relative to the most an output value depends on what it is computed from
    relative_size: float
    #: whether that is so small that a fold's rounding may reach the tensor's largest value
    cancels: bool
    #: how far a fold's rounding may move the values most dependent on what they are computed from
    rounding: float
    #: how much each value depends on what it is computed from (0 where the perturbed run overflowed)
    dependence: torch.Tensor


def sums_its_input(module):
    '''Whether ``module`` computes each output value as a sum over its input (a layer with a weight matrix or
    kernel, a normalisation with running statistics): its rounding is relative to the sum of the terms' magnitudes,
    which may be far larger than the value.'''
    weight = getattr(module, 'weight', None)
    return (isinstance(weight, torch.Tensor) and weight.ndim >= 2) or is_batch_norm(module)


def perturbation_hooks(model, seed=0):
    '''Forward hooks on every module of ``model`` without children that add to each floating-point tensor it
    returns (a tensor, or one in a tuple or list) ``PERTURBATION`` times uniform noise in [-1, 1] (drawn from a
    generator of their own) times the tensor's largest finite absolute value for a module that sums its input
    (:py:func:`sums_its_input`), else times each value's own magnitude (a softmax's small probabilities are computed
    to their own precision). Tensors other than dense ones (sparse, nested) and outputs of other structures are left
    as they are. Remove the hooks with the handles returned.'''
    generator = torch.Generator().manual_seed(seed)

    def perturbed(tensor, summed):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.is_nested or (
                tensor.layout != torch.strided) or not tensor.numel():
            return tensor
        magnitude = tensor.detach().abs().nan_to_num(nan=0., posinf=0.)
        magnitude = magnitude.max() if summed else magnitude
        noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1
        return tensor + PERTURBATION * magnitude * noise.to(tensor.device, tensor.dtype)

    def hook(module, args, output):
        summed = sums_its_input(module)
        if type(output) in (tuple, list):
            return type(output)(perturbed(item, summed) for item in output)
        return perturbed(output, summed)
    return [module.register_forward_hook(hook) for module in model.modules() if not next(module.children(), None)]


def value_scales(perturbed, expected):
    '''For each tensor of the float64 output ``expected``, the scales of its values for comparing outputs (see
    :py:func:`output_differences`), or None where ``perturbed``, the same model's output with every leaf module's
    output perturbed (:py:func:`perturbation_hooks`), does not match its structure.

    How far a value moves, over ``PERTURBATION``, is how much it depends on the values it is computed from, as
    rounding sees them. A fold's rounding may change it by ``ROUNDING_ALLOWANCE`` float64 epsilons of that (none
    where the perturbed run overflows). A value's scale is the larger of this (in units of
    :py:func:`output_tolerance`) and its own magnitude, and at most the tensor's largest value: a small value beside
    large ones in the same tensor is compared on its own size, a value that is small by cancelling (a logit near
    zero) on the size of what cancelled, and no value more loosely than on the tensor's largest value. Where a whole
    tensor cancels below a fold's rounding (a Siamese difference on a near-duplicate pair) nothing on these inputs
    tells an exact fold from a wrong one: it stays compared on its largest value, and :py:attr:`ValueScale.cancels`
    says so.

    Returns
    -------
    list[:py:class:`ValueScale` or None] or None
    '''
    perturbed, expected = output_tensors(perturbed), output_tensors(expected)
    if len(perturbed) != len(expected) or any(p.shape != e.shape for p, e in zip(perturbed, expected)):
        return None
    allowance = ROUNDING_ALLOWANCE * torch.finfo(torch.float64).eps
    scales = []
    for moved, e in zip(perturbed, expected):
        finite = torch.isfinite(e)
        if not (e.is_floating_point() or e.is_complex()) or moved.dtype != e.dtype or e.layout != torch.strided or (
                not finite.any()):
            scales.append(None)
            continue
        magnitude = e.abs().double()
        largest = magnitude[finite].max().item()
        dependence = (moved - e).abs().double() / PERTURBATION
        dependence = torch.where(torch.isfinite(dependence), dependence, 0.)  # overflowed (a log of a perturbed 0)
        scale = torch.maximum(magnitude, allowance / output_tolerance(e.dtype) * dependence).clamp(max=largest)
        most = dependence[finite].max().item()
        relative_size = largest / most if most else float('inf')
        scales.append(ValueScale(scale, relative_size, relative_size * output_tolerance(e.dtype) < allowance,
                                 allowance * most, dependence))
    return scales


class FoldCheck:
    '''Run copies of ``model`` with some folds done on ``example_inputs`` and compare them with the model.

    The model and inputs are converted to float64 where the model runs in float64, so the comparison sees the
    folds' exactness, not the model dtype's rounding; a run with every leaf module's output slightly perturbed
    then tells the scale of each output value (see :py:func:`value_scales`). Otherwise they run in their own dtype,
    and each output tensor is compared on the scale of its largest value. ``model`` is never run or changed, only
    copies of it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The user's model.
    example_inputs: :py:obj:`torch.Tensor` or tuple
        Positional arguments of its forward.

    Raises
    ------
    TypeError
        If ``example_inputs`` is not a tensor or tuple.
    ValueError
        If the model raises on ``example_inputs``.
    '''
    def __init__(self, model, example_inputs):
        inputs = as_input_tuple(example_inputs)
        self.description = describe_inputs(inputs)
        try:
            self.model = model_copy(model).double()
            self.inputs = tuple(value.double() if torch.is_tensor(value) and value.is_floating_point() else value
                                for value in inputs)
            self.expected = self.run(model_copy(self.model))  # a copy: the forward may change its buffers
            self.dtype = torch.float64
        except Exception:  # the forward may not run in float64 (a constant of another dtype in forward)
            self.model, self.inputs, self.scales = model_copy(model), inputs, None
            try:
                self.expected = self.run(model_copy(self.model))
            except Exception as error:
                raise ValueError(
                    f'{type(model).__name__} raised {type(error).__name__} on example_inputs ({self.description}): '
                    f'{error}. Pass example inputs the model takes.') from error
            self.dtype = output_dtype(self.expected)
        else:
            self.scales = self.perturbed_scales()
        # an output without tensors (a string, an object of the model's own) cannot be compared
        self.comparable = bool(output_tensors(self.expected))

    def perturbed_scales(self):
        '''The scales of the float64 output's values (see :py:func:`value_scales`), from a run of a copy of the
        model with its leaf modules' outputs perturbed; None where that run fails.'''
        perturbed_model = model_copy(self.model)
        perturbation_hooks(perturbed_model)
        try:
            perturbed = self.run(perturbed_model)
        except Exception:  # a forward may refuse what the hooks return (a check of a tensor's identity)
            return None
        return value_scales(perturbed, self.expected)

    def run(self, model):
        '''The output of ``model`` on the example inputs, without gradients (see :py:func:`seeded_output`).'''
        return seeded_output(model, self.inputs)

    def problem(self, folds):
        '''Why the model with ``folds`` done is not the model on the example inputs, or None: the error the fused
        copy raises (a fused layer's rank check among them), or how far its output is from the model's.

        Parameters
        ----------
        folds: list[:py:class:`~zennit_bnfuse.report.FusedBatchNorm`]
            The folds to do.

        Returns
        -------
        None, :py:class:`~zennit_bnfuse.layers.FoldedInputError` or str
        '''
        fused = replaced_copy(self.model, replacement_modules(self.model, FusionReport(fused=list(folds))))
        try:
            actual = self.run(fused)
        except FoldedInputError as error:
            return error
        except Exception as error:  # any error the fused copy raises where the model did not
            return f'the model raises {type(error).__name__}: {error}'
        return output_mismatch(actual, self.expected, self.scales) if self.comparable else None


def check_folds(model, report, example_inputs):
    '''Keep only the folds of ``report`` that hold on ``example_inputs``; move the others to ``report.unfused``.

    Every fold is checked for its layers' input ranks and by comparing outputs: a traced graph proves its folds on
    the path it traced, and the forward may take another for these inputs (a check of an argument's value); an
    untraced model (``report.traced`` False) has no proof but this. All folds are tried at once first; where that
    fails, those of a layer whose rank check failed are dropped, and then the rest are tried one by one, each on top
    of the folds kept so far, so that one bad fold does not discard the good ones.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model the report was made for; not changed.
    report: :py:class:`~zennit_bnfuse.report.FusionReport`
        Changed in place; ``report.checked_on`` says on what the folds were checked.
    example_inputs: :py:obj:`torch.Tensor` or tuple
        Positional arguments of the model's forward.

    Raises
    ------
    TypeError, ValueError
        See :py:class:`FoldCheck`.
    '''
    check = FoldCheck(model, example_inputs)
    report.checked_on = f'example_inputs {check.description}, computed in {check.dtype}' + (
        '' if check.comparable else ' (input ranks only: the output holds no tensor to compare)')

    def refusal(fold, problem):
        if isinstance(problem, FoldedInputError):
            problem = (f'`{problem.layer}` gets an input of shape {problem.shape}, on which the fold is not exact '
                       '(the BatchNorm acts on dim 1, the layer on its features)')
        untraced = '' if report.traced else f'the forward could not be traced ({report.trace_error}); '
        neighbour = '' if report.traced else ' (its nn.Sequential neighbour)'
        layers = ', '.join(f'`{layer}`' for layer in fold.layers)
        return UnfusedBatchNorm(fold.bn, f'{untraced}with it folded into {layers}{neighbour}, on example_inputs '
                                f'({check.description}) {problem}')

    pending, refused = list(report.fused), []
    if not check.comparable and not report.traced:  # nothing but the output could prove them
        refused = [refusal(fold, 'gives an output that holds no tensor, so nothing shows the fold exact')
                   for fold in pending]
        pending = []
    problem = check.problem(pending) if pending else None
    while isinstance(problem, FoldedInputError):
        refused += [refusal(fold, problem) for fold in pending if problem.layer in fold.layers]
        pending = [fold for fold in pending if problem.layer not in fold.layers]
        problem = check.problem(pending) if pending else None
    if problem is not None:
        kept = []
        for fold in pending:
            problem = check.problem(kept + [fold])
            if problem is None:
                kept.append(fold)
            else:
                refused.append(refusal(fold, problem))
        pending = kept
    report.fused = pending
    report.unfused += refused


def refuse_unproven(report):
    '''Move every fold of an untraced model's ``report`` to ``report.unfused``: without example inputs nothing proves
    them.'''
    for fold in report.fused:
        layers = ', '.join(f'`{layer}`' for layer in fold.layers)
        report.unfused.append(UnfusedBatchNorm(
            fold.bn, f'the forward could not be traced ({report.trace_error}), so no fold is proven; it is next to '
            f'{layers} inside an nn.Sequential, which the forward may call in parts or in another order: pass '
            'example_inputs (to fuse(), FuseBatchNorm, FusedLRP or CompositeLRP) to fold it if it gives the '
            'model\'s output on them'))
    report.fused = []
