'''The fusion report: which BatchNorms were folded where, and why the others were not.'''
from dataclasses import dataclass, field


SIDES = {
    'after': 'into the layer before it (layer -> BN)',
    'before': 'into the layer after it (BN -> layer)',
    'before-relu': 'into the layer after it through a ReLU (BN -> ReLU -> layer)',
}


@dataclass(frozen=True)
class FusedBatchNorm:
    '''A BatchNorm that was folded.

    Attributes
    ----------
    bn: str
        Name of the BatchNorm module.
    layer: str
        Name of the Linear/Conv/ConvTranspose module it was folded into (the first, if several).
    side: str
        ``'after'`` (the BN followed the layer), ``'before'`` (the BN preceded the layer) or ``'before-relu'`` (BN ->
        ReLU -> layer: the BN became a thresholded ReLU and its scale moved into the layer).
    via: tuple[str, ...]
        The ops between the BN and the layer(s), if any.
    also: tuple[str, ...]
        Further layers that took a part of the fold: for ``'after'``, the other layers whose outputs a
        ``torch.cat`` joins before the BN (each takes its own channels, in order); for ``'before'`` and
        ``'before-relu'``, the other layers that read the BN's output (each takes the same fold).
    '''
    bn: str
    layer: str
    side: str
    via: tuple = ()
    also: tuple = ()

    @property
    def layers(self):
        '''All the layers it was folded into, ``(layer, *also)``.'''
        return (self.layer, *self.also)


@dataclass(frozen=True)
class UnfusedBatchNorm:
    '''A BatchNorm left in place, with the reason in words.'''
    bn: str
    reason: str


@dataclass
class FusionReport:
    '''Result of finding fusable BatchNorms in a model.

    Attributes
    ----------
    fused: list[:py:class:`FusedBatchNorm`]
        One entry per folded BatchNorm, in forward order.
    unfused: list[:py:class:`UnfusedBatchNorm`]
        One entry per BatchNorm left in place.
    traced: bool
        Whether the model's forward was traced with torch.fx. Otherwise only adjacent modules inside
        ``nn.Sequential`` containers were considered, and folded only where example inputs were given and the model
        with the fold gave the model's output on them.
    trace_error: str or None
        Why tracing failed, if it did.
    checked_on: str or None
        The example inputs the folds were checked on (shapes, dtypes and the dtype of the comparison), if any.
    standardized: list[str]
        timm's weight-standardised convolutions that take no fold but become plain convolutions with their
        standardised weight, so that LRP rules modify the weight the layer computes with (folds into such a layer
        make it plain, too).
    '''
    fused: list = field(default_factory=list)
    unfused: list = field(default_factory=list)
    traced: bool = True
    trace_error: str = None
    checked_on: str = None
    standardized: list = field(default_factory=list)

    @property
    def num_batch_norms(self):
        '''Total number of BatchNorms in the model.'''
        return len(self.fused) + len(self.unfused)

    def __str__(self):
        lines = [f'BatchNorm fusion: {len(self.fused)} of {self.num_batch_norms} folded']
        if not self.traced:
            lines.append(f'forward not traced ({self.trace_error}); only nn.Sequential neighbours were considered')
            if self.checked_on:
                lines.append(f'a fold was kept only where it gave the model\'s output on {self.checked_on}')
            else:
                lines.append('none was folded: pass example_inputs to fold those that give the model\'s output on them')
        elif self.checked_on:
            lines.append(f'the folded layers\' input ranks were checked on {self.checked_on}')
        if self.fused:
            rows = [(item.bn, ', '.join(item.layers), item.side + (f' via {", ".join(item.via)}' if item.via else ''))
                    for item in self.fused]
            lines += ['', *_table(('BatchNorm', 'folded into', 'side'), rows)]
        if self.unfused:
            rows = [(item.bn, item.reason) for item in self.unfused]
            lines += ['', *_table(('BatchNorm left in place', 'reason'), rows)]
        if self.standardized:
            lines += ['', f'weight-standardised convs made plain: {", ".join(self.standardized)}']
        return '\n'.join(lines)

    def to_dict(self):
        '''The report as JSON-serialisable dict.'''
        return {
            'fused': [{'bn': item.bn, 'layer': item.layer, 'side': item.side, 'via': list(item.via),
                       'also': list(item.also)} for item in self.fused],
            'unfused': [{'bn': item.bn, 'reason': item.reason} for item in self.unfused],
            'traced': self.traced,
            'trace_error': self.trace_error,
            'checked_on': self.checked_on,
            'standardized': list(self.standardized),
        }


def _table(header, rows):
    '''Format rows of strings as a left-aligned text table.'''
    widths = [max(len(str(row[col])) for row in (header, *rows)) for col in range(len(header))]

    def line(row):
        return '  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
    return [line(header), line(['-' * width for width in widths]), *(line(row) for row in rows)]
