'''Figures: heatmap grids (input | naive | unfused | fused) and mean perturbation curves.'''
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402


def heatmap_grid(images, relevance, path, row_labels=None, title=None):
    '''Save a grid with one row per image: the input, then the relevance of each handling.

    Relevance is summed over channels and shown red (positive) / blue (negative), each heatmap scaled to its own
    largest absolute value.

    Parameters
    ----------
    images: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` in [0, 1].
    relevance: dict[str, :py:obj:`torch.Tensor`]
        Column title -> ``(N, C, H, W)`` relevance.
    path: str or Path
        The PNG to write.
    row_labels: list[str], optional
        One label per row (e.g. the predicted class).
    title: str, optional
    '''
    count = len(images)
    columns = 1 + len(relevance)
    figure, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.9 * count), squeeze=False)
    for row in range(count):
        image = images[row].detach().cpu()
        axes[row, 0].imshow(image.permute(1, 2, 0).squeeze(-1), cmap='gray' if image.shape[0] == 1 else None,
                            vmin=0, vmax=1)
        for column, (name, values) in enumerate(relevance.items(), start=1):
            heatmap = values[row].detach().cpu().sum(dim=0)
            limit = heatmap.abs().max().clamp(min=1e-12).item()
            axes[row, column].imshow(heatmap, cmap='bwr', vmin=-limit, vmax=limit)
            if row == 0:
                axes[0, column].set_title(name)
        if row_labels is not None:
            axes[row, 0].set_ylabel(row_labels[row])
    axes[0, 0].set_title('input')
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
