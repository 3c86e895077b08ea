'''The BatchNorm-handling study declared in ``benchmarks/study_protocol.md``: is LRP with BatchNorm fused more
faithful than LRP with BatchNorm unfused, passed (naive) or merged by Zennit?

For every model and training seed, every regime (as trained, negative BatchNorm scales, bias-free rules), every
composite and every handling, this explains the predicted class of the test images, measures ROAD (the primary metric),
region perturbation with four replacement values, complexity, conservation and the cascading randomisation check,
compares the handlings paired per image (Wilcoxon, Holm over the declared family, bootstrap intervals, win rates),
derives the verdicts by the protocol's rules and writes ``<out>/faithfulness.md`` and ``.json`` (protocol, tables,
command, machine, date) and figures.

The whole study (hours on a CPU)::

    python benchmarks/study.py

A smoke test (two MNIST models, one seed, a few images)::

    python benchmarks/study.py --quick --out /tmp/study

Several processes (the images of each model are sharded; the tables are the same)::

    torchrun --nproc_per_node=4 benchmarks/study.py

Per-image results of each (model, seed) are kept in ``--cache`` (default ``benchmarks/results/study-cache``), so an
interrupted run continues where it stopped; ``--fresh`` ignores them, and ``--cached-only`` writes the report from the
units already there (listing the protocol's units that are missing) without running any; ``--rerender`` rewrites the
report and figures from the results file after a change to their layout.
'''
import argparse
import copy
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from zennit_bnfuse import CompositeLRP, fuse
from zennit_bnfuse.evaluation.composites import batch_norm_rule, make_composite
from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.metrics import (
    BASELINES, conservation_error, gini_index, image_noise, region_perturbation, relevance_entropy, relevance_gap,
    road,
)
from zennit_bnfuse.evaluation.models import SEEDS, dataset_of, pretrained, weights_path
from zennit_bnfuse.evaluation.randomisation import cascading_randomisation
from zennit_bnfuse.evaluation.regimes import flip_batch_norm_signs, relative_output_difference
from zennit_bnfuse.fold import is_batch_norm
from zennit_bnfuse.handling import bn_handling

from provenance import command_line, device_description, machine, strict_float32, today
from study_analysis import summarise
from study_design import (
    CLAIM_MODELS, COMPOSITES, FUNCTION_TOLERANCE, HANDLINGS, NEGATIVE_SHARE, PATCH_SIZE, PATCHES_PER_STEP, PROTOCOL,
    RANDOM_STREAM, RANDOMISATION_COMPOSITE, REGIMES, ROAD_STEPS, TWINS, claim_of, method_key, regime_composite,
    split_key,
)
from study_report import read_results, report_markdown, results_json, rounded, write_figures

RESULTS = Path(__file__).parent / 'results'


def conv_batch_norms(model):
    '''Names of the model's BatchNorms of conv feature maps (BatchNorm2d/3d, wherever they sit): the ones claim 2
    keeps fused in every arm, so that only the BatchNorm1d handling varies.'''
    return {name for name, module in model.named_modules()
            if is_batch_norm(module) and not isinstance(module, torch.nn.BatchNorm1d)}


def base_model(name, model):
    '''The model the handlings are applied to: for the claim-2 models a copy with every conv BatchNorm fused, so that
    only the BatchNorm1d handling varies (protocol); the model itself otherwise.'''
    if claim_of(name) != 2:
        return model, None
    conv = conv_batch_norms(model)
    if not conv:
        return model, None
    fused, report = fuse(model, include=lambda bn_name, module: bn_name in conv)
    return fused, report


def batched(function, *tensors, batch_size):
    '''``function`` over batches of ``tensors`` (split along dim 0), concatenated.'''
    return torch.cat([function(*parts) for parts in zip(*(tensor.split(batch_size) for tensor in tensors))])


def random_relevance(images, image_ids):
    '''Uniform relevance in [-1, 1], fixed per image by its id (a noise stream of its own).'''
    return image_noise(images, image_ids.tolist(), 'uniform', RANDOM_STREAM) * 2 - 1


def gradient_x_input(model, images, targets):
    '''Gradient x input of the target logit.'''
    images = images.clone().requires_grad_(True)
    output = model(images).gather(1, targets[:, None]).sum()
    return (torch.autograd.grad(output, images)[0] * images).detach()


def digest(tensor):
    '''A hash of a tensor's bytes (bitwise equality of relevance).'''
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def duplicate_methods(relevance, gather_digests=lambda values: [values]):
    '''``{key: the first key with bitwise the same relevance on every image}`` for the methods that repeat one
    before them. ``gather_digests(list) -> list of lists`` shares the hashes between processes, so that duplicates
    are decided on all images. The same relevance gives the same measurements: every regime's model computes the
    same function (checked in :py:meth:`UnitEvaluation.regime_models`).'''
    keys = list(relevance)
    all_hashes = gather_digests([digest(relevance[key]) for key in keys])
    first, duplicates = {}, {}
    for index, key in enumerate(keys):
        signature = tuple(ranks[index] for ranks in all_hashes)
        if signature in first:
            duplicates[key] = first[signature]
        else:
            first[signature] = key
    return duplicates


def recheck_duplicates(name, seed, data, args):
    '''Decide the duplicates of a cached unit that ran on CUDA before :py:meth:`UnitEvaluation.run` decided them
    on the CPU: recompute its relevance on the CPU (the same images, targets from the CPU's logits), and drop the
    measurements of the methods that repeat an earlier one bit for bit there, as a run on the CPU would have done.
    Returns the number of duplicates, or None where the unit needs nothing (not cached, or not from CUDA).

    Raises
    ------
    RuntimeError
        If the unit was computed with other settings or weights, on other images than the first ``--images``, or
        did not measure the method a repeat repeats.
    '''
    cache = args.cache / f'{name}-seed{seed}.pt'
    if not cache.is_file():
        return None
    stored = torch.load(cache, map_location='cpu', weights_only=False)
    results = stored['results']
    provenance = results.get('provenance') or {}
    if 'device cuda' not in provenance.get('machine', '') or 'duplicates' in provenance:
        return None
    if stored['config'] != unit_config(args, name, seed):
        raise RuntimeError(f'{cache} was computed with other settings than these; run it again')
    images, labels, channel_mean = data[dataset_of(name)]
    ids = torch.tensor(results['image'])
    if not torch.equal(ids, torch.arange(len(images))):
        raise RuntimeError(f'{cache} holds images {ids[:3].tolist()}..., not the first {len(images)}')
    cpu_args = argparse.Namespace(**{**vars(args), 'device': 'cpu'})
    unit = UnitEvaluation(name, seed, images, labels, ids, channel_mean, cpu_args)
    duplicates = duplicate_methods(unit.explain_all()[0])
    for key, first in duplicates.items():
        if key in results['methods'] and first not in results['methods']:
            raise RuntimeError(f'{cache}: {key} repeats {first}, which the unit did not measure')
        results['methods'].pop(key, None)
    results['duplicates'] = duplicates
    provenance['duplicates'] = (f'decided on the CPU by `{args.command}` on {args.host}, {today()} (CUDA\'s backward '
                                f'is not bit-reproducible)')
    results['provenance'] = provenance
    torch.save(stored, cache)
    return len(duplicates)


class UnitEvaluation:
    '''Every per-image measurement of one (model, seed), on this process's share of the images.

    Parameters
    ----------
    name: str
        The model.
    seed: int
        The training seed.
    images, labels, image_ids: :py:obj:`torch.Tensor`
        This process's images ``(n, C, H, W)`` on the device, their labels and global ids.
    channel_mean: :py:obj:`torch.Tensor`
        The per-channel mean of the test set, for the ``'mean'`` replacement.
    args: argparse.Namespace
    '''
    def __init__(self, name, seed, images, labels, image_ids, channel_mean, args):
        self.name, self.seed, self.args = name, seed, args
        self.images, self.labels, self.ids = images, labels, image_ids
        self.channel_mean = channel_mean
        self.model = pretrained(name, device=args.device, seed=seed)
        with torch.no_grad():
            logits = batched(self.model, images, batch_size=args.batch_size)
        self.targets = logits.argmax(dim=1)
        self.explained = logits.gather(1, self.targets[:, None])[:, 0]
        self.results = {'image': image_ids.tolist(), 'correct': (self.targets.cpu() == labels).tolist(),
                        'methods': {}, 'duplicates': {}, 'checks': {}, 'not_applicable': {}}

    def regime_models(self):
        '''``{regime: (model explained, model perturbed)}``: the perturbation curves always use the model whose
        function is being explained; the handlings apply to the first.'''
        models = {}
        for regime in self.args.regimes:
            model = self.model
            if regime == 'negative-scales':
                flip = flip_batch_norm_signs(self.model, share=NEGATIVE_SHARE, seed=self.seed)
                error = relative_output_difference(self.model, flip.model, self.images)
                self.results['checks']['negative_scales'] = {
                    'function_error': error, 'flipped': {bn: len(channels) for bn, channels in flip.flipped.items()},
                    'skipped': flip.skipped, 'negative_share': flip.negative_share()}
                if not error <= FUNCTION_TOLERANCE:
                    raise RuntimeError(f'{self.name} seed {self.seed}: the sign-flipped copy changes the function by '
                                       f'{error:.2e} (tolerance {FUNCTION_TOLERANCE:.0e})')
                model = flip.model
            base, report = base_model(self.name, model)
            if report is not None:
                self.results['checks']['conv_batch_norms_fused'] = len(report.fused)
            models[regime] = (base, model)
        return models

    def relevance(self, base, composite, handling):
        '''Relevance of this process's images under one method, or None where the handling does not apply.'''
        try:
            lrp = CompositeLRP(base, make_composite(composite), handling=handling,
                               batch_norm_rule=batch_norm_rule(composite, handling))
            return batched(lambda batch, target: lrp.attribute(batch, target=target).detach(), self.images,
                           self.targets, batch_size=self.args.batch_size)
        except ValueError as error:
            if handling != 'zennit':
                raise
            return str(error)

    def measure(self, model, relevance, secondary):
        '''Per-image metrics of one relevance tensor on ``model`` (the function it explains); the region
        perturbation curves only where ``secondary``.'''
        args, seeds = self.args, self.ids.tolist()
        common = dict(seeds=seeds, batch_size=args.eval_batch_size)
        result = road(model, self.images, relevance, self.targets, percentages=ROAD_STEPS, **common)
        metrics = {'road_abpc': result.abpc, 'road_aopc_morf': result.aopc_morf}
        # mean curves times the images (so that shards add up), with the share of pixels removed at each point
        curves = {'road_morf': result.morf.mean(dim=0), 'road_lerf': result.lerf.mean(dim=0),
                  'road_removed': result.removed}
        for baseline in BASELINES if secondary else ():
            result = region_perturbation(
                model, self.images, relevance, self.targets, patch_size=PATCH_SIZE, patches_per_step=PATCHES_PER_STEP,
                baseline=baseline, channel_mean=self.channel_mean, **common)
            metrics[f'aopc_morf_{baseline}'] = result.aopc_morf
            metrics[f'abpc_{baseline}'] = result.abpc
            curves[f'morf_{baseline}'] = result.morf.mean(dim=0)
            curves['removed'] = result.removed
        heatmap = relevance.sum(dim=1)
        metrics.update(gini=gini_index(heatmap), entropy=relevance_entropy(heatmap),
                       conservation=conservation_error(relevance, self.explained),
                       gap=relevance_gap(relevance, self.explained))
        return ({key: value.double().cpu().tolist() for key, value in metrics.items()},
                {key: (value.double().cpu() * len(self.images)).tolist() for key, value in curves.items()})

    def randomisation(self, base, composite, handling):
        '''Per-image Spearman correlation of |heatmap| with the trained model's after each randomised layer.'''
        attributions = {}

        def explain(model, inputs, targets):
            # one attribution object for the randomised copy: it rebuilds its LRP-ready copy when a layer changes
            if id(model) not in attributions:
                attributions[id(model)] = CompositeLRP(model, make_composite(composite), handling=handling,
                                                       batch_norm_rule=batch_norm_rule(composite, handling))
            return attributions[id(model)].attribute(inputs, target=targets).sum(dim=1)
        chosen = self.ids < self.args.randomisation_images
        result = cascading_randomisation(base, explain, self.images[chosen], self.targets[chosen], seed=self.seed,
                                         batch_size=self.args.batch_size)
        return {'layers': result.layers, 'spearman_abs': result.spearman_abs.tolist()}

    def explain_all(self):
        '''Relevance of every method on this process's images, ``{key: (n, C, H, W)}`` in the study's order, with
        ``{key: model whose function it explains}`` and ``{key: (base model, composite, handling)}``; handlings that
        do not apply are noted in the results.'''
        relevance = {'random': random_relevance(self.images, self.ids),
                     'gradient-x-input': batched(lambda x, y: gradient_x_input(self.model, x, y), self.images,
                                                 self.targets, batch_size=self.args.batch_size)}
        evaluated_on = {'random': self.model, 'gradient-x-input': self.model}
        explained_by = {}
        for regime, (base, model) in self.regime_models().items():
            for composite in self.args.composites:
                name = regime_composite(composite, regime)
                for handling in self.args.handlings:
                    key = method_key(regime, composite, handling)
                    values = self.relevance(base, name, handling)
                    if isinstance(values, str):
                        self.results['not_applicable'][key] = values
                        continue
                    relevance[key], evaluated_on[key], explained_by[key] = values, model, (base, name, handling)
        return relevance, evaluated_on, explained_by

    def on_cpu(self):
        '''This unit on the CPU: the same images and targets, the model loaded afresh, results of its own.'''
        unit = copy.copy(self)
        unit.args = argparse.Namespace(**{**vars(self.args), 'device': 'cpu'})
        unit.model = pretrained(self.name, device='cpu', seed=self.seed)
        unit.images, unit.targets = self.images.cpu(), self.targets.cpu()
        unit.results = {'methods': {}, 'duplicates': {}, 'checks': {}, 'not_applicable': {}}
        return unit

    def run(self, progress, gather_digests):
        '''Compute everything; ``gather_digests(list) -> list of lists`` shares relevance hashes between processes
        so that duplicates are decided on all images.'''
        args = self.args
        methods = self.results['methods']
        relevance, evaluated_on, explained_by = self.explain_all()
        # on CUDA two methods with the same rules on the same function can differ in the last bits (on an H200 none
        # of the repeats a CPU unit finds came out bitwise equal; cuDNN's default algorithms are not bit-reproducible):
        # decide on the CPU
        exact = relevance if self.images.device.type == 'cpu' else self.on_cpu().explain_all()[0]
        self.results['duplicates'] = duplicate_methods(exact, gather_digests)
        keys = list(relevance)
        progress.reset(total=len(keys))
        progress.set_description(f'{self.name} seed {self.seed}')
        for key in keys:
            if key not in self.results['duplicates']:
                regime, composite, handling = split_key(key)
                secondary = regime in ('trained', 'baseline')
                per_image, curves = self.measure(evaluated_on[key], relevance[key], secondary)
                methods[key] = {'metrics': per_image, 'curves': curves}
                if regime == 'trained' and composite == RANDOMISATION_COMPOSITE and args.randomisation_images:
                    methods[key]['randomisation'] = self.randomisation(*explained_by[key])
            progress.update()
        if makes_heatmaps(self.name, self.seed, args):
            self.results['heatmaps'] = self.heatmap_examples(relevance)
        return self.results

    def heatmap_examples(self, relevance):
        '''One image per class (the first of each predicted class on this process) with its heatmaps.'''
        rows = {}
        for index, target in enumerate(self.targets.tolist()):
            rows.setdefault(target, index)
        keys = [key for key in relevance if split_key(key)[0] in ('trained', 'baseline')]
        return {int(self.ids[index]): {'target': target, 'image': self.images[index].cpu().tolist(),
                                       'relevance': {key: relevance[key][index].sum(dim=0).cpu().tolist()
                                                     for key in keys}}
                for target, index in sorted(rows.items())}


# ----------------------------------------------------------------------------------------------------------------
# running the units (one model and seed each), sharded over processes, cached per unit

def merge(shards):
    '''Join the per-process results of one unit in global image order.'''
    order = np.argsort([image for shard in shards for image in shard['image']], kind='stable')

    def joined(lists):
        flat = [value for values in lists for value in values]
        return [flat[index] for index in order]

    first = shards[0]
    merged = {key: joined([shard[key] for shard in shards]) for key in ('image', 'correct')}
    merged.update({key: first[key] for key in ('duplicates', 'checks', 'not_applicable')})
    merged['seconds'] = max(shard['seconds'] for shard in shards)
    merged['methods'] = {}
    for key, method in first['methods'].items():
        entry = {'metrics': {metric: joined([shard['methods'][key]['metrics'][metric] for shard in shards])
                             for metric in method['metrics']},
                 'curves': {curve: np.sum([shard['methods'][key]['curves'][curve] for shard in shards],
                                          axis=0).tolist() for curve in method['curves']}}
        if 'randomisation' in method:
            parts = [shard['methods'][key]['randomisation'] for shard in shards]
            entry['randomisation'] = {'layers': parts[0]['layers'],
                                      'spearman_abs': [row for part in parts for row in part['spearman_abs']]}
        merged['methods'][key] = entry
    heatmaps = {}
    for shard in shards:
        for image, example in (shard.get('heatmaps') or {}).items():
            if example['target'] not in {other['target'] for other in heatmaps.values()}:
                heatmaps[image] = example
    if heatmaps:
        merged['heatmaps'] = dict(sorted(heatmaps.items()))
    return merged


def makes_heatmaps(name, seed, args):
    '''Whether the unit of ``name`` and ``seed`` keeps heatmap examples for the figures (seed 0 of the heatmap
    models).'''
    return name in args.heatmap_models and seed == SEEDS[0]


def weights_digest(name, seed):
    '''A hash of the shipped weights of a model and seed.'''
    return hashlib.sha1(Path(str(weights_path(name, seed))).read_bytes()).hexdigest()


def unit_config(args, name, seed):
    '''What a cached unit must have been computed with to be reused (the weights included).'''
    return {'weights': weights_digest(name, seed), 'images': args.images, 'composites': list(args.composites),
            'handlings': list(args.handlings), 'regimes': list(args.regimes),
            'randomisation_images': args.randomisation_images, 'patch_size': PATCH_SIZE,
            'patches_per_step': PATCHES_PER_STEP, 'negative_share': NEGATIVE_SHARE,
            'heatmaps': makes_heatmaps(name, seed, args)}


def run_unit(name, seed, data, args, rank, world, progress):
    '''The merged per-image results of one unit (on rank 0; None elsewhere), from the cache where it has them.'''
    cache = args.cache / f'{name}-seed{seed}.pt'
    if not args.fresh and cache.is_file():
        stored = torch.load(cache, map_location='cpu', weights_only=False)
        if stored['config'] == unit_config(args, name, seed):
            return stored['results'] if rank == 0 else None
    if args.cached_only:
        return None
    images, labels, channel_mean = data[dataset_of(name)]
    ids = torch.arange(len(images))[rank::world]
    start = time.time()
    unit = UnitEvaluation(name, seed, images[ids].to(args.device), labels[ids], ids, channel_mean.to(args.device),
                          args)

    def gather(values):
        if world == 1:
            return [values]
        gathered = [None] * world
        dist.all_gather_object(gathered, values)
        return gathered

    shard = unit.run(progress, gather)
    shard['seconds'] = time.time() - start
    shards = gather(shard)
    if rank != 0:
        return None
    results = merge(shards)
    results['provenance'] = {'command': args.command, 'machine': args.host, 'date': today()}
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save({'config': unit_config(args, name, seed), 'results': results}, cache)
    return results


# ----------------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = [*CLAIM_MODELS[1], *CLAIM_MODELS[2], *TWINS.values()]
    parser.add_argument('--models', default=','.join(default_models), help='comma-separated model names')
    parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='comma-separated training seeds')
    parser.add_argument('--images', type=int, default=1000, help='test images per model and seed')
    parser.add_argument('--composites', default=','.join(COMPOSITES))
    parser.add_argument('--handlings', default=','.join(HANDLINGS))
    parser.add_argument('--regimes', default=','.join(REGIMES))
    parser.add_argument('--randomisation-images', type=int, default=100,
                        help='images (the first of each model) for the randomisation check; 0 skips it')
    parser.add_argument('--heatmap-models', default='mnist-cnn-bn,cifar10-vgg-bn,cifar10-preact-resnet')
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--download', action='store_true', help='let torchvision download missing data')
    parser.add_argument('--batch-size', type=int, default=100, help='images per attribution batch')
    parser.add_argument('--eval-batch-size', type=int, default=1000, help='perturbed images per forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', type=Path, default=RESULTS)
    parser.add_argument('--cache', type=Path, help='per-unit results (default: <out>/study-cache)')
    parser.add_argument('--fresh', action='store_true', help='ignore cached per-unit results')
    parser.add_argument('--rerender', action='store_true',
                        help='rewrite <out>/<tag>.md and the figures from <out>/<tag>.json and the cache, without '
                             'recomputing anything (after a change to the report\'s layout)')
    parser.add_argument('--cached-only', action='store_true',
                        help='report the units in --cache and run nothing; the report lists the units missing')
    parser.add_argument('--tag', default='faithfulness', help='file name of the tables (without extension)')
    parser.add_argument('--recheck-duplicates', action='store_true',
                        help='for cached units computed on CUDA before duplicates were decided on the CPU: decide '
                        'them there (relevance recomputed, no metric) and drop the duplicates\' measurements')
    parser.add_argument('--no-figures', action='store_true')
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: mnist-cnn-bn and mnist-mlp-bn, seed 0, 12 images, two composites')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.images = 'mnist-cnn-bn,mnist-mlp-bn', '0', 12
        args.composites, args.randomisation_images = 'epsilon-plus-flat,captum-epsilon', 4
        args.heatmap_models = 'mnist-cnn-bn'
    args.models = args.models.split(',')
    args.seeds = [int(seed) for seed in args.seeds.split(',')]
    args.composites = args.composites.split(',')
    args.handlings = args.handlings.split(',')
    args.regimes = args.regimes.split(',')
    args.heatmap_models = [name for name in args.heatmap_models.split(',') if name in args.models]
    for name in args.models:
        dataset_of(name)
    for composite in args.composites:
        make_composite(composite)
    for handling in args.handlings:
        bn_handling(handling)
    unknown = [regime for regime in args.regimes if regime not in REGIMES]
    if unknown:
        parser.error(f'unknown regime {unknown[0]!r}; choose from {", ".join(REGIMES)}')
    args.cache = args.cache or args.out / 'study-cache'
    if args.fresh and args.cached_only:
        parser.error('--fresh ignores the cache that --cached-only reports; give one of them')
    return args


def load_data(dataset, args, progress):
    '''The study's images of ``dataset``, their labels and the per-channel mean of its test set.'''
    images, labels = load_tensors(dataset, args.data_root, train=False, download=args.download, limit=args.images,
                                  progress=progress)
    everything, _ = load_tensors(dataset, args.data_root, train=False, progress=progress)
    return images, labels, everything.mean(dim=(0, 2, 3))


def rerender(args, argv):
    '''Rewrite the report and figures from the results file (its command, machine and date, and a line naming the
    command that rewrote it), with the figures from the units in the cache that match the settings; the results file
    itself is rewritten in the current layout (:py:func:`results_json`), its numbers rounded as a run rounds them.'''
    path = args.out / f'{args.tag}.json'
    results = rounded(read_results(path.read_text()))
    path.write_text(results_json(results))
    summary = {key: value for key, value in results.items() if key not in ('command', 'machine', 'date', 'protocol')}
    (args.out / f'{args.tag}.md').write_text(report_markdown(
        summary, args, results['command'], results['machine'], results['date'],
        rewritten=(command_line(argv, 'python'), today())))
    if not args.no_figures:
        args.cached_only = True
        units = {(name, seed): run_unit(name, seed, None, args, 0, 1, None) for seed in args.seeds
                 for name in args.models}
        write_figures({key: unit for key, unit in units.items() if unit is not None}, summary, args)
    print(f'rewrote {args.out / (args.tag + ".md")}')


def main(argv=None):
    args = parse_args(argv)
    if args.rerender:
        return rerender(args, argv)
    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    rank, world = 0, 1
    if distributed:
        backend = 'nccl' if args.device.startswith('cuda') else 'gloo'
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == 'nccl':
            args.device = f'cuda:{int(os.environ.get("LOCAL_RANK", rank))}'
            torch.cuda.set_device(args.device)
    launcher = f'torchrun --nproc_per_node={world}' if distributed else 'python'
    args.command = command_line(argv, launcher)
    args.host = machine(device_description(args.device), f'{world} process(es)')
    strict_float32()  # relevance is compared bit for bit and against exact references: no TF32 on CUDA
    data, units = {}, {}
    if args.recheck_duplicates:
        if distributed:
            raise SystemExit('--recheck-duplicates runs in one process')
        for seed in args.seeds:
            for name in args.models:
                dataset = dataset_of(name)
                if dataset not in data:
                    data[dataset] = load_data(dataset, args, True)
                found = recheck_duplicates(name, seed, data, args)
                if found is not None:
                    print(f'{name} seed {seed}: {found} duplicates decided on the CPU')
        return
    with tqdm(desc='study', disable=rank != 0) as progress:
        for seed in args.seeds:
            for name in args.models:
                dataset = dataset_of(name)
                if dataset not in data:
                    data[dataset] = load_data(dataset, args, rank == 0)
                result = run_unit(name, seed, data, args, rank, world, progress)
                if result is not None:
                    units[(name, seed)] = result
    if rank == 0:
        command, host, date = args.command, args.host, today()
        summary = rounded(summarise(units, args))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f'{args.tag}.md').write_text(report_markdown(summary, args, command, host, date))
        (args.out / f'{args.tag}.json').write_text(results_json(
            {'command': command, 'machine': host, 'date': date, 'protocol': PROTOCOL.read_text(), **summary}))
        if not args.no_figures:
            write_figures(units, summary, args)
        print(f'wrote {args.out / (args.tag + ".md")}')
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
