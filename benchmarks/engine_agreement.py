'''How far the default engines' relevance is from the libraries' own hooks, model by model.

For each model of the zoo (``benchmarks/zoo.py``: weights=None, BatchNorm statistics randomised) and for timm's
levit_128s and coatnet_nano_rw_224 (token layouts: a residual sum whose first operand is not contiguous), in float64,
on one random image (seed 0), this computes

- ``CompositeLRP(model, EpsilonPlusFlat())`` with its default engine (SinglePass) and with ``engine='zennit'``
  (Zennit's own hooks on the same prepared copy);
- ``FusedLRP(model)`` with its default engine and with ``engine='captum'`` (Captum's hooks);

and reports, for each pair, whether the two relevances are equal bit for bit (``torch.equal``) and else
max |default - hooks| / max |hooks|. It writes ``benchmarks/results/engine-agreement.md`` and ``.json`` with the
command, machine and date; the README's numbers for the engines' last-bit differences come from there.

    python benchmarks/engine_agreement.py                         # every model (about 20 minutes on 2 CPU threads)
    python benchmarks/engine_agreement.py --suites timm --models levit_128s
'''
import argparse
import json
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import CompositeLRP, FusedLRP

from provenance import command_line, header, machine, today
from zoo import INPUT_SIZES, SUITES, randomize_statistics, randomized

RESULTS = Path(__file__).parent / 'results'
# token-layout models the README names, beside the zoo's
EXTRA_TIMM_MODELS = ('levit_128s', 'coatnet_nano_rw_224')
PAIRS = {
    'CompositeLRP': (lambda model: CompositeLRP(model, EpsilonPlusFlat()),
                     lambda model: CompositeLRP(model, EpsilonPlusFlat(), engine='zennit')),
    'FusedLRP': (lambda model: FusedLRP(model), lambda model: FusedLRP(model, engine='captum')),
}


def build(suite, arch, size):
    '''The randomised float64 model and one random image for it; timm models made for the input side ``size``
    where their constructor takes one (levit, coatnet).'''
    if suite == 'timm' and arch in EXTRA_TIMM_MODELS:
        import timm
        torch.manual_seed(0)
        model = randomize_statistics(timm.create_model(arch, pretrained=False, img_size=size).eval())
    else:
        model = randomized(suite, arch)
    size = 299 if arch == 'inception_v3' else size
    input = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model.double(), input


def agreement(actual, expected):
    '''``'equal'`` where bit for bit, else max |actual - expected| / max |expected|.'''
    if torch.equal(actual, expected):
        return 'equal'
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def measure(suite, arch, size):
    '''One row: the agreement of each class's default engine with the library's hooks, or the error it raised.'''
    model, input = build(suite, arch, size)
    row = {'suite': suite, 'model': arch, 'input_size': input.shape[-1]}
    for name, (default, hooks) in PAIRS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the zoo's own warnings (blocks kept whole, ops passed by gradient)
                row[name] = agreement(default(model).attribute(input, target=0).detach(),
                                      hooks(model).attribute(input, target=0).detach())
        except Exception as error:  # a model an engine refuses is a row, not the end of the run
            row[name] = f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'
    return row


def cell(value):
    return f'{value:.1e}' if isinstance(value, float) else value


def write_report(rows, command, results=RESULTS):
    '''Write engine-agreement.md and .json under ``results``.'''
    host, date = machine(), today()
    lines = header('Default engines against the libraries\' own hooks', command, host, date) + [
        '- models: the zoo\'s (weights=None / pretrained=False, BatchNorm statistics randomised, seed 0) and timm\'s '
        f'{", ".join(EXTRA_TIMM_MODELS)}; float64; one random image (seed 0), target 0',
        '- CompositeLRP: EpsilonPlusFlat, default engine (SinglePass) against engine=\'zennit\'; FusedLRP: default '
        'rules, default engine against engine=\'captum\'',
        '- each cell: `equal` (torch.equal), else max |default - hooks| / max |hooks|',
        '', '| suite | model | input | CompositeLRP | FusedLRP |', '| --- | --- | --- | --- | --- |',
        *(f'| {row["suite"]} | {row["model"]} | {row["input_size"]} | {cell(row["CompositeLRP"])} | '
          f'{cell(row["FusedLRP"])} |' for row in rows), '']
    results.mkdir(parents=True, exist_ok=True)
    (results / 'engine-agreement.md').write_text('\n'.join(lines))
    (results / 'engine-agreement.json').write_text(
        json.dumps({'command': command, 'machine': host, 'date': date, 'rows': rows}, indent=1) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suites', default='torchvision,timm', help='comma-separated: torchvision, timm')
    parser.add_argument('--models', default=None, help='comma-separated architectures (one suite only)')
    parser.add_argument('--input-size', type=int, default=None, help='input side (default: 224 torchvision, 64 timm)')
    parser.add_argument('--results', type=Path, default=RESULTS, help='where to write the tables')
    args = parser.parse_args(argv)
    suites = args.suites.split(',')
    if args.models and len(suites) != 1:
        parser.error('--models needs exactly one suite in --suites')
    work = [(suite, arch, args.input_size or INPUT_SIZES[suite]) for suite in suites
            for arch in (args.models.split(',') if args.models else
                         SUITES[suite] + (EXTRA_TIMM_MODELS if suite == 'timm' else ()))]
    rows = [measure(*item) for item in tqdm(work, desc='engine agreement')]
    write_report(rows, command_line(argv), args.results)
    print((args.results / 'engine-agreement.md').read_text())


if __name__ == '__main__':
    main()
