'''Figures: heatmap grids (input | naive | unfused | fused) and mean perturbation curves.'''
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
import torch  # noqa: E402


HEATMAP_COLOURS = 'bwr'  # blue negative, white zero, red positive
HEATMAP_SCALE = 'relevance / max |relevance| of each heatmap'
# the grid's layout in inches: fixed, so that no text can overlap another whatever the number of rows and columns
CELL, GAP, LEFT, RIGHT = 1.7, .08, .35, .1
TITLE_LINE, HEADER, BAR_SPACE, BAR_HEIGHT, BAR_LABELS = .24, .3, .2, .15, .55


def heatmap_figure(images, relevance, row_labels=None, title=None, max_rows=8):
    '''A grid with one row per image: the input, then the relevance of each entry of ``relevance``, in its order.

    Relevance is summed over channels and shown red (positive) / blue (negative), each heatmap scaled to its own
    largest absolute value; a colour bar says so. Only the first ``max_rows`` images are drawn, and the title
    says so when there are more.

    Parameters
    ----------
    images: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` in [0, 1].
    relevance: dict[str, :py:obj:`torch.Tensor`]
        Column title -> ``(N, C, H, W)`` relevance.
    row_labels: list[str], optional
        One label per drawn image (e.g. the explained class).
    title: str, optional
    max_rows: int

    Returns
    -------
    :py:class:`matplotlib.figure.Figure`
    '''
    total = len(images)
    count = min(total, max_rows)
    columns = 1 + len(relevance)
    lines = ([title] if title else []) + ([f'first {count} of {total} images'] if count < total else [])
    top = len(lines) * TITLE_LINE + HEADER + .05
    bottom = BAR_SPACE + BAR_HEIGHT + BAR_LABELS
    width = LEFT + columns * CELL + (columns - 1) * GAP + RIGHT
    height = top + count * CELL + (count - 1) * GAP + bottom
    figure = plt.figure(figsize=(width, height))

    def box(left, lower, box_width, box_height):  # inches from the lower left corner -> figure fraction
        return [left / width, lower / height, box_width / width, box_height / height]

    for row in range(count):
        lower = height - top - (row + 1) * CELL - row * GAP
        axes = [figure.add_axes(box(LEFT + column * (CELL + GAP), lower, CELL, CELL)) for column in range(columns)]
        image = images[row].detach().cpu()
        axes[0].imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap='gray' if image.shape[0] == 1 else None,
                       vmin=0, vmax=1)
        for axis, values in zip(axes[1:], relevance.values()):
            heatmap = values[row].detach().cpu().sum(dim=0)
            limit = heatmap.abs().max().clamp(min=1e-12).item()
            axis.imshow((heatmap / limit).numpy(), cmap=HEATMAP_COLOURS, vmin=-1, vmax=1)
        for axis in axes:
            axis.set_xticks([])
            axis.set_yticks([])
        if row_labels is not None:
            axes[0].set_ylabel(row_labels[row])
        if row == 0:
            for axis, name in zip(axes, ('input', *relevance)):
                axis.set_title(name)
    bar_axis = figure.add_axes(box(LEFT + CELL + GAP + CELL * .05, BAR_LABELS,
                                   (columns - 1) * (CELL + GAP) - GAP - CELL * .1, BAR_HEIGHT), label='colour bar')
    bar = figure.colorbar(ScalarMappable(Normalize(-1, 1), HEATMAP_COLOURS), cax=bar_axis,
                          orientation='horizontal', ticks=[-1, 0, 1])
    bar.set_ticklabels(['-1 (negative)', '0', '1 (positive)'])
    bar.set_label(HEATMAP_SCALE)
    if lines:
        figure.suptitle('\n'.join(lines), y=1 - .05 / height, va='top')
    return figure


def heatmap_grid(images, relevance, path, row_labels=None, title=None, max_rows=8):
    '''Save :py:func:`heatmap_figure` as a PNG.

    Parameters
    ----------
    images, relevance, row_labels, title, max_rows:
        As for :py:func:`heatmap_figure`.
    path: str or Path
        The PNG to write.

    Returns
    -------
    int
        The number of images drawn.
    '''
    figure = heatmap_figure(images, relevance, row_labels, title, max_rows)
    try:
        figure.savefig(path, dpi=100, bbox_inches='tight', pad_inches=.1)
    finally:
        plt.close(figure)
    return min(len(images), max_rows)


def curves_figure(curves, path, title='Mean perturbation curves (MoRF)'):
    '''Save mean MoRF perturbation curves, one panel per model and one line per method.

    Parameters
    ----------
    curves: dict[str, dict[str, :py:obj:`torch.Tensor`]]
        Model name -> method label -> ``(N, K + 1)`` MoRF curves.
    path: str or Path
        The PNG to write.
    title: str
    '''
    count = len(curves)
    columns = min(count, 4)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, (name, methods) in zip(axes.flat, curves.items()):
        for label, values in methods.items():
            values = torch.as_tensor(values, dtype=torch.float64)
            style = '--' if label in ('random', 'gradient-x-input') else '-'
            axis.plot(values.mean(dim=0), label=label, linestyle=style)
        axis.set_title(name)
        axis.set_xlabel('perturbation step')
        axis.set_ylabel('target logit')
    for axis in axes.flat[count:]:
        axis.axis('off')
    axes.flat[0].legend(fontsize='small')
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
