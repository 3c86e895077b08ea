'''What the study's metrics cost per 1000 images: ROAD, region perturbation, cascading randomisation, statistics.

For one shipped model and ``--images`` test images (their predicted classes as targets), with EpsilonPlusFlat
relevance under the fused handling, this times once each: the relevance itself; ROAD's MoRF and LeRF curves over
the default percentages (and, separately, the noisy linear imputation alone, against Quantus' per-image
``noisy_linear_imputation`` on a subset); region perturbation with each replacement value; the cascading
model-parameter randomisation of every layer; one paired comparison of 1000 scores with its bootstrap intervals.
Times are wall clock, scaled to 1000 images (the randomisation: per method, all layers). Writes
``benchmarks/results/metric-costs.md`` and ``metric-costs.json``.

    python benchmarks/metric_costs.py --model cifar10-vgg-bn --images 1000
'''
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_noisy_linear_imputation

from zennit_bnfuse import CompositeLRP
from zennit_bnfuse.evaluation.composites import make_composite
from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.explain import predicted_classes
from zennit_bnfuse.evaluation.metrics import (
    BASELINES, ROAD_PERCENTAGES, noisy_linear_imputation, region_perturbation, road, road_masks,
)
from zennit_bnfuse.evaluation.models import DATASET_STATS, dataset_of, pretrained
from zennit_bnfuse.evaluation.randomisation import cascading_randomisation, randomisation_layers
from zennit_bnfuse.evaluation.statistics import paired_comparison

from provenance import command_line, header, machine, today

RESULTS = Path(__file__).parent / 'results'


def timed(function):
    '''``(result, seconds)`` of one call.'''
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def explain(model, inputs, targets):
    '''EpsilonPlusFlat relevance, BatchNorm fused.'''
    return CompositeLRP(model, make_composite('epsilon-plus-flat')).attribute(inputs, target=targets)


def measure(args):
    '''All timings, in seconds for ``args.images`` images (or the stated subset).'''
    model = pretrained(args.model)
    dataset = dataset_of(args.model)
    images, _ = load_tensors(dataset, args.data_root, download=args.download, limit=args.images)
    targets = predicted_classes(model, images)
    relevance, seconds = timed(lambda: torch.cat([
        explain(model, batch, target) for batch, target in zip(images.split(64), targets.split(64))]))
    costs = {'relevance (EpsilonPlusFlat, fused)': seconds}

    _, costs['ROAD, MoRF + LeRF'] = timed(lambda: road(model, images, relevance, targets, seeds=range(len(images))))
    masks = road_masks(relevance, 'morf', ROAD_PERCENTAGES)
    _, imputation = timed(lambda: [noisy_linear_imputation(images, masks[:, step])
                                   for step in range(1, masks.shape[1])])
    costs['ROAD imputation alone (MoRF + LeRF, this package)'] = 2 * imputation
    subset = min(args.quantus_images, len(images))
    flat = masks[:subset, 1:, 0].flatten(start_dim=2).numpy()
    _, quantus = timed(lambda: [
        quantus_noisy_linear_imputation(images[index].numpy(), np.flatnonzero(flat[index, step]))
        for index in range(subset) for step in range(flat.shape[1])])
    costs[f'ROAD imputation alone (MoRF + LeRF, Quantus, timed on {subset} images)'] = \
        2 * quantus * len(images) / subset

    for baseline in BASELINES:
        _, costs[f'region perturbation, {baseline} (4x4 patches, 8 per step)'] = timed(lambda: region_perturbation(
            model, images, relevance, targets, patch_size=4, patches_per_step=8, baseline=baseline,
            channel_mean=DATASET_STATS[dataset][0]))

    count = min(args.randomisation_images, len(images))
    _, seconds = timed(lambda: cascading_randomisation(model, explain, images[:count], targets[:count]))
    layers = len(randomisation_layers(model))
    costs[f'cascading randomisation, all {layers} layers (timed on {count} images)'] = seconds * len(images) / count

    return costs


def comparison_seconds():
    '''Seconds for one paired comparison of 1000 per-image scores (Wilcoxon, both bootstrap intervals).'''
    rng = np.random.default_rng(0)
    return timed(lambda: paired_comparison(rng.normal(size=1000), rng.normal(size=1000)))[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='cifar10-vgg-bn')
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('--quantus-images', type=int, default=50, help='images for timing Quantus\' imputation')
    parser.add_argument('--randomisation-images', type=int, default=200)
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--download', action='store_true', help='let torchvision download missing data')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    costs = measure(args)
    load = f'load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs)'
    scale = 1000 / args.images
    rows = {name: seconds * scale for name, seconds in costs.items()}
    rows['one paired comparison of 1000 images (Wilcoxon, 2 bootstrap intervals of 10000 resamples)'] = \
        comparison_seconds()
    command, description, date = command_line(argv), machine(load), today()
    lines = header('Metric costs per 1000 images', command, description, date)
    lines += ['', f'{args.model}, {args.images} test images, ROAD at {list(ROAD_PERCENTAGES)} %; seconds per 1000 '
              'images for one method (the paired comparison: per comparison).', '',
              '| step | seconds |', '| --- | ---: |']
    lines += [f'| {name} | {seconds:.1f} |' for name, seconds in rows.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'metric-costs.md').write_text('\n'.join(lines) + '\n')
    record = {'command': command, 'machine': description, 'date': date, 'model': args.model, 'images': args.images,
              'seconds_per_1000_images': rows}
    (RESULTS / 'metric-costs.json').write_text(json.dumps(record, indent=1) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
