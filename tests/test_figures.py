'''Tests of zennit_bnfuse.evaluation.figures: the heatmap grid's columns, colour bar, row note and layout.'''
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from zennit_bnfuse.evaluation.figures import HEATMAP_SCALE, heatmap_figure, heatmap_grid

COLUMNS = ('fused', 'unfused', 'naive')


def inputs(count, columns=COLUMNS):
    generator = torch.Generator().manual_seed(count)
    images = torch.rand(count, 3, 8, 8, generator=generator)
    return images, {name: torch.randn(count, 3, 8, 8, generator=generator) for name in columns}


def image_axes(figure):
    '''The axes that show images, in drawing order (the colour bar excluded).'''
    return [axis for axis in figure.axes if axis.get_label() != 'colour bar']


def test_columns_in_the_given_order_each_heatmap_scaled_to_its_max():
    images, relevance = inputs(2, ('naive', 'fused'))
    figure = heatmap_figure(images, relevance, ['a', 'b'], 'title')
    axes = image_axes(figure)
    assert [axis.get_title() for axis in axes[:3]] == ['input', 'naive', 'fused']
    assert [axis.get_ylabel() for axis in axes[::3]] == ['a', 'b']
    shown = axes[5].get_images()[0].get_array()  # row 1, 'fused'
    summed = relevance['fused'][1].sum(dim=0)
    assert np.allclose(shown, (summed / summed.abs().max()).numpy())
    plt.close(figure)


def test_colour_bar_red_positive_blue_negative():
    figure = heatmap_figure(*inputs(1))
    bar = [axis for axis in figure.axes if axis.get_label() == 'colour bar']
    assert len(bar) == 1 and bar[0].get_xlabel() == HEATMAP_SCALE and bar[0].get_xlim() == (-1, 1)
    heatmap = image_axes(figure)[1].get_images()[0]
    red, white, blue = heatmap.to_rgba(np.array([1., 0., -1.]))
    assert red[0] > .9 > red[2] and blue[2] > .9 > blue[0] and min(white[:3]) > .9
    assert [label.get_text() for label in bar[0].get_xticklabels()] == ['-1 (negative)', '0', '1 (positive)']
    plt.close(figure)


@pytest.mark.parametrize('count, drawn, note', [(3, 3, False), (8, 8, False), (11, 8, True)])
def test_only_max_rows_drawn_and_said(count, drawn, note):
    figure = heatmap_figure(*inputs(count), title='model, composite', max_rows=8)
    assert len(image_axes(figure)) == drawn * 4
    assert (f'first 8 of {count} images' in figure.get_suptitle()) == note
    plt.close(figure)


def overlaps(first, second):
    '''Whether two display boxes overlap by more than a pixel.'''
    return min(first.x1, second.x1) - max(first.x0, second.x0) > 1 and \
        min(first.y1, second.y1) - max(first.y0, second.y0) > 1


@pytest.mark.parametrize('count, columns, truncated', [
    (1, 1, False), (1, 3, False), (2, 3, False), (6, 3, False), (8, 3, True)])
def test_no_text_overlaps(count, columns, truncated):
    images, relevance = inputs(count + 4 * truncated, COLUMNS[:columns])
    figure = heatmap_figure(images, relevance, ['label'] * count, 'cifar10-vgg-bn, EpsilonPlusFlat')
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    axes = image_axes(figure)
    headers = [axis.title.get_window_extent(renderer) for axis in axes[:columns + 1]]
    boxes = [axis.get_window_extent(renderer) for axis in axes]
    assert not any(overlaps(title, box) for box in headers + boxes)
    assert not any(overlaps(header, box) for header in headers for box in boxes)
    assert not any(overlaps(first, second) for index, first in enumerate(headers) for second in headers[index + 1:])
    plt.close(figure)


def test_grid_writes_png_and_returns_rows_drawn(tmp_path):
    path = tmp_path / 'grid.png'
    assert heatmap_grid(*inputs(10), path, max_rows=8) == 8
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert plt.get_fignums() == []
