'''How much the study's primary metric, ROAD ABPC, depends on the order of tied pixels.

ROAD ranks pixels by their relevance summed over channels, ties in row-major order, the same for MoRF and LeRF. A
heatmap that gives many pixels exactly the same relevance (Captum's epsilon rule gives MNIST's black background 0)
leaves much of the ranking to that order. For one shipped model and seed and the study's images, this computes each
method's relevance as the study does, then ROAD ABPC twice: as the study ranks the pixels, and with the ties broken at
random (a seeded perturbation below a millionth of the smallest non-zero |relevance|, which keeps every strict order).
Writes ``benchmarks/results/road-ties.md`` and ``road-ties.json``.

    python benchmarks/road_ties.py --model mnist-cnn-bn --seed 0 --images 32
'''
import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from zennit_bnfuse import CompositeLRP
from zennit_bnfuse.evaluation.composites import batch_norm_rule, make_composite
from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.explain import predicted_classes
from zennit_bnfuse.evaluation.metrics import road
from zennit_bnfuse.evaluation.models import dataset_of, pretrained

from provenance import command_line, header, machine, today
from study_design import ROAD_STEPS

RESULTS = Path(__file__).parent / 'results'


def tie_breaking(relevance, seed=0):
    '''``relevance`` with ties broken at random: a perturbation below a millionth of its smallest non-zero
    magnitude (of the channel sum ROAD ranks), the same in every channel's share.'''
    pixels = relevance.sum(dim=1, keepdim=True)
    smallest = pixels[pixels != 0].abs().min() if pixels.any() else torch.tensor(1., dtype=relevance.dtype)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed), dtype=relevance.dtype)
    return relevance + noise * smallest * 1e-6 / relevance.shape[1]


def measure(args):
    '''One row per method: share of pixels with relevance exactly 0, median ROAD ABPC as ranked and with random
    ties, and the mean per-image change.'''
    model = pretrained(args.model, seed=args.seed)
    images, _ = load_tensors(dataset_of(args.model), args.data_root, train=False, download=args.download,
                             limit=args.images, progress=False)
    targets = predicted_classes(model, images)
    seeds = list(range(len(images)))
    rows = []
    methods = [(composite, handling) for composite in args.composites.split(',')
               for handling in args.handlings.split(',')]
    for composite, handling in tqdm(methods, desc='methods'):
        lrp = CompositeLRP(model, make_composite(composite), handling=handling,
                           batch_norm_rule=batch_norm_rule(composite, handling))
        relevance = lrp.attribute(images, target=targets).detach()
        ranked = road(model, images, relevance, targets, percentages=ROAD_STEPS, seeds=seeds).abpc
        shuffled = road(model, images, tie_breaking(relevance), targets, percentages=ROAD_STEPS, seeds=seeds).abpc
        rows.append({'composite': composite, 'handling': handling,
                     'zero_share': (relevance.sum(dim=1) == 0).double().mean().item(),
                     'median_abpc': ranked.median().item(), 'median_abpc_random_ties': shuffled.median().item(),
                     'mean_abs_change': (ranked - shuffled).abs().mean().item()})
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='mnist-cnn-bn')
    parser.add_argument('--seed', type=int, default=0, help='training seed of the shipped weights')
    parser.add_argument('--images', type=int, default=32, help='the first test images, as the study takes them')
    parser.add_argument('--composites', default='captum-epsilon,epsilon-plus-flat')
    parser.add_argument('--handlings', default='fused,naive')
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--download', action='store_true', help='let torchvision download missing data')
    parser.add_argument('--out', type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args)
    command, description, date = command_line(argv), machine(), today()
    lines = header('ROAD ABPC and the order of tied pixels', command, description, date)
    lines += ['', f'{args.model} (training seed {args.seed}), the first {args.images} test images, their predicted '
              f'classes; ROAD at {list(ROAD_STEPS)} %, as in the study. "random ties": the same relevance with its '
              'ties broken at random.', '',
              '| composite | handling | pixels with relevance 0 | median ROAD ABPC | with random ties | '
              'mean abs. change per image |', '| --- | --- | ---: | ---: | ---: | ---: |']
    lines += [f'| {row["composite"]} | {row["handling"]} | {row["zero_share"]:.2f} | {row["median_abpc"]:.3f} | '
              f'{row["median_abpc_random_ties"]:.3f} | {row["mean_abs_change"]:.3f} |' for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'road-ties.md').write_text('\n'.join(lines) + '\n')
    record = {'command': command, 'machine': description, 'date': date, 'model': args.model, 'seed': args.seed,
              'images': args.images, 'rows': rows}
    (args.out / 'road-ties.json').write_text(json.dumps(record, indent=1) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
