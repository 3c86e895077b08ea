'''The cascading model-parameter randomisation sanity check (Adebayo et al. 2018, *Sanity Checks for Saliency Maps*).

The layers of a copy of the model are re-initialised one at a time from the output down, cumulatively; after each
one the explanations are recomputed and compared, image by image, with those of the trained model. An explanation
that depends on what the model learned changes as the top layers lose their weights; one that stays the same (a
Spearman correlation near 1 all the way down) explains the input, not the model, and fails the check.

The layers and their re-initialisation follow Quantus' ``MPRT`` (``layer_order='top_down'``): every module with a
``reset_parameters`` method, in reverse ``named_modules`` order, each reset by PyTorch's default initialisation right
after ``torch.manual_seed(seed + 1)``. A BatchNorm's ``reset_parameters`` is not random: it becomes the identity
(running mean 0, variance 1, weight 1, bias 0).
'''
import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def randomisation_layers(model):
    '''The modules cascading randomisation re-initialises, in the order it does (output first).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`

    Returns
    -------
    list[str]
        Names of the modules with a ``reset_parameters`` method, in reverse ``named_modules`` order.
    '''
    return [name for name, module in model.named_modules() if hasattr(module, 'reset_parameters')][::-1]


def average_ranks(values):
    '''Ranks 1 .. P of each row, ties given their average rank (as ``scipy.stats.rankdata``).

    Parameters
    ----------
    values: :py:obj:`torch.Tensor`
        ``(N, P)``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, P)`` float64.
    '''
    values = values.double()
    ordered, order = values.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.cumsum(dim=1) - 1
    position = torch.arange(1, values.shape[1] + 1, dtype=torch.float64, device=values.device).expand_as(ordered)
    sums = torch.zeros_like(ordered).scatter_add_(1, group, position)
    counts = torch.zeros_like(ordered).scatter_add_(1, group, torch.ones_like(ordered))
    return torch.empty_like(ordered).scatter_(1, order, (sums / counts.clamp(min=1)).gather(1, group))


def spearman(first, second):
    '''Spearman rank correlation of each pair of rows: the Pearson correlation of their average ranks.

    Parameters
    ----------
    first, second: :py:obj:`torch.Tensor`
        ``(N, ...)`` each, flattened per example.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)`` float64; NaN where a row is constant or has a non-finite value.
    '''
    first, second = first.flatten(start_dim=1), second.flatten(start_dim=1)
    finite = torch.isfinite(first).all(dim=1) & torch.isfinite(second).all(dim=1)
    ranks = [average_ranks(values) for values in (first, second)]
    centred = [rank - rank.mean(dim=1, keepdim=True) for rank in ranks]
    covariance = (centred[0] * centred[1]).sum(dim=1)
    scale = ((centred[0] ** 2).sum(dim=1) * (centred[1] ** 2).sum(dim=1)).sqrt()
    return torch.where(finite & (scale > 0), covariance / scale, torch.nan)


@dataclass
class RandomisationResult:
    '''Similarity of the explanations to those of the trained model, per image, after each randomised layer.

    Attributes
    ----------
    layers: list[str]
        The randomised modules in order: column ``k`` has layers ``0 .. k`` randomised.
    spearman: :py:obj:`torch.Tensor`
        ``(N, L)``: Spearman rank correlation of the relevance with the trained model's.
    spearman_abs: :py:obj:`torch.Tensor`
        ``(N, L)``: the same of ``|relevance|``.
    '''
    layers: list
    spearman: torch.Tensor
    spearman_abs: torch.Tensor


def explain_in_batches(explain, model, inputs, targets, batch_size):
    '''``explain(model, inputs, targets)`` over batches of ``batch_size``, concatenated and detached.'''
    return torch.cat([
        explain(model, batch, target).detach()
        for batch, target in zip(inputs.split(batch_size), targets.split(batch_size))
    ])


def randomise(module, seed):
    '''Re-initialise ``module`` by its ``reset_parameters`` right after ``torch.manual_seed(seed + 1)`` (Quantus'
    convention), leaving the global random state as it was.'''
    devices = sorted({tensor.device.index or 0 for tensor in module.parameters() if tensor.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def cascading_randomisation(model, explain, inputs, targets, layers=None, seed=42, batch_size=64, progress=False):
    '''Cascading model-parameter randomisation of a copy of ``model``, output layer first.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The trained model, in eval mode; it is not changed.
    explain: callable
        ``explain(model, inputs, targets) -> relevance``: builds the attribution for the model it is given (a
        randomised copy) and returns ``(B, ...)`` relevance, e.g.
        ``lambda model, x, y: CompositeLRP(model, make_composite('epsilon-plus-flat')).attribute(x, target=y)``.
        Sum over channels inside it to compare heatmaps rather than per-channel relevance.
    inputs: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices; the same targets are explained for every randomised model.
    layers: sequence of str, optional
        The modules to randomise, in order; default :py:func:`randomisation_layers`. Each must have
        ``reset_parameters``.
    seed: int
        Re-initialisation seed (Quantus' default 42); the result is deterministic given it (on one device type).
    batch_size: int
        Images per ``explain`` call.
    progress: bool
        Show a progress bar over the layers.

    Returns
    -------
    :py:class:`RandomisationResult`

    Raises
    ------
    ValueError
        If a layer does not exist or cannot be re-initialised.
    '''
    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    layers = randomisation_layers(randomised) if layers is None else list(layers)
    for name in layers:
        if not hasattr(modules.get(name), 'reset_parameters'):
            raise ValueError(f'cannot randomise `{name}`: the model has no module of that name with '
                             'reset_parameters(); see randomisation_layers(model)')
    original = explain_in_batches(explain, randomised, inputs, targets, batch_size)
    signed, magnitude = [], []
    for name in tqdm(layers, desc='randomising', disable=not progress, leave=False):
        randomise(modules[name], seed)
        relevance = explain_in_batches(explain, randomised, inputs, targets, batch_size)
        signed.append(spearman(original, relevance))
        magnitude.append(spearman(original.abs(), relevance.abs()))
    empty = torch.empty(len(inputs), 0, dtype=torch.float64)
    return RandomisationResult(
        layers=layers,
        spearman=torch.stack(signed, dim=1) if signed else empty,
        spearman_abs=torch.stack(magnitude, dim=1) if magnitude else empty,
    )
