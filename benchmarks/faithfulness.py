'''The BatchNorm-handling study: are LRP heatmaps more faithful when BatchNorm is fused?

For each model x composite x BatchNorm handling (fused, unfused, naive), plus a random attribution and gradient x input
per model, this explains the predicted class of the first N test images, perturbs them region by region (most and
least relevant first), and reports AOPC and the area between the LeRF and MoRF curves with 95% confidence intervals,
and the paired differences fused - unfused and fused - naive on the same images. It writes
``<out>/faithfulness.md`` and ``.json`` (tables, command, machine, date) and figures.

One process::

    python benchmarks/faithfulness.py --images 1000

Several processes (images are sharded; the tables are the same)::

    torchrun --nproc_per_node=2 benchmarks/faithfulness.py --images 1000
'''
import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from zennit_bnfuse import CompositeLRP, HANDLINGS
from zennit_bnfuse.evaluation.composites import COMPOSITES, DISPLAY_NAMES, make_composite
from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.explain import predicted_classes, relevance_by_handling
from zennit_bnfuse.evaluation.figures import curves_figure, heatmap_grid
from zennit_bnfuse.evaluation.metrics import conservation_error, mean_ci, region_perturbation
from zennit_bnfuse.evaluation.models import CIFAR10_CLASSES, MNIST_CLASSES, MODELS, dataset_of, pretrained

from provenance import command_line, header, machine, today

RESULTS = Path(__file__).parent / 'results'
BASELINE_METHODS = ('random', 'gradient-x-input')


def method_key(composite, handling):
    '''The key of one attribution method in the results.'''
    return f'{composite}/{handling}'


def attribute(model, method, images, targets, image_ids, batch_size, lrp_cache):
    '''Relevance ``(N, C, H, W)`` of ``images`` for ``targets`` under ``method``.'''
    if method == 'random':
        return torch.stack([
            torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(10 ** 6 + int(index))) * 2 - 1
            for index in image_ids]).to(images.device)
    relevance = []
    for start in range(0, len(images), batch_size):
        batch, target = images[start:start + batch_size], targets[start:start + batch_size]
        if method == 'gradient-x-input':
            batch = batch.clone().requires_grad_(True)
            output = model(batch).gather(1, target[:, None]).sum()
            relevance.append((torch.autograd.grad(output, batch)[0] * batch).detach())
        else:
            relevance.append(lrp_cache[method].attribute(batch, target=target).detach())
    return torch.cat(relevance)


def evaluate_model(name, images, labels, image_ids, args, progress):
    '''Per-image metrics of every method on one model: ``{method: {metric: list}}``.'''
    device = images.device
    model = pretrained(name, device=device)
    with torch.no_grad():
        logits = torch.cat([model(images[start:start + args.batch_size])
                            for start in range(0, len(images), args.batch_size)])
    targets = logits.argmax(dim=1)
    explained = logits.gather(1, targets[:, None])[:, 0]
    methods = [method_key(composite, handling) for composite in args.composites for handling in args.handlings]
    lrp_cache = {
        method_key(composite, handling): CompositeLRP(model, make_composite(composite), handling=handling)
        for composite in args.composites for handling in args.handlings
    }
    results = {'image': image_ids.tolist(), 'correct': (targets.cpu() == labels).tolist(), 'methods': {}}
    for method in (*BASELINE_METHODS, *methods):
        relevance = attribute(model, method, images, targets, image_ids, args.batch_size, lrp_cache)
        curves = region_perturbation(
            model, images, relevance, targets, patch_size=args.patch_size, patches_per_step=args.patches_per_step,
            baseline=args.baseline if args.baseline == 'noise' else float(args.baseline),
            seeds=image_ids.tolist(), batch_size=args.eval_batch_size)
        results['methods'][method] = {
            'aopc_morf': curves.aopc_morf.tolist(),
            'aopc_lerf': curves.aopc_lerf.tolist(),
            'abpc': curves.abpc.tolist(),
            'conservation': conservation_error(relevance, explained).tolist(),
            'morf_curve': curves.morf.tolist(),
            'lerf_curve': curves.lerf.tolist(),
        }
        progress.update()
    return results


def merge(shards):
    '''Concatenate per-rank results of one model in global image order.'''
    order = sorted(range(sum(len(shard['image']) for shard in shards)),
                   key=[image for shard in shards for image in shard['image']].__getitem__)

    def joined(values):
        flat = [value for shard_values in values for value in shard_values]
        return [flat[index] for index in order]

    merged = {key: joined([shard[key] for shard in shards]) for key in ('image', 'correct')}
    merged['methods'] = {
        method: {metric: joined([shard['methods'][method][metric] for shard in shards])
                 for metric in shards[0]['methods'][method]}
        for method in shards[0]['methods']
    }
    return merged


def summarise(results):
    '''Means with 95% intervals per method, and paired differences, from merged per-image results.'''
    summary = {}
    for name, model_results in results.items():
        methods = model_results['methods']
        rows = {method: {metric: mean_ci(torch.tensor(values[metric]))
                         for metric in ('aopc_morf', 'aopc_lerf', 'abpc', 'conservation')}
                for method, values in methods.items()}
        differences = {}
        for method in methods:
            composite, _, handling = method.partition('/')
            if handling != 'fused':
                continue
            for other in ('unfused', 'naive'):
                other_method = method_key(composite, other)
                if other_method in methods:
                    differences[f'{composite}: fused - {other}'] = {
                        metric: mean_ci(torch.tensor(methods[method][metric]) -
                                        torch.tensor(methods[other_method][metric]))
                        for metric in ('aopc_morf', 'abpc')}
        summary[name] = {
            'images': len(model_results['image']),
            'accuracy_on_images': sum(model_results['correct']) / len(model_results['correct']),
            'methods': rows,
            'differences': differences,
        }
    return summary


def format_ci(value):
    mean, half = value
    return f'{mean:.3f} ± {half:.3f}'


def classify(metrics, rows, method, other_method):
    """One paired comparison in words: 'better', 'worse', 'mixed' or 'no difference' for fused, from AOPC (MoRF)
    and ABPC; 'identical' where the two handlings gave the same numbers on every image, and 'uniform' where both
    heatmaps are uniform (MoRF and LeRF curves coincide on every image), which makes the comparison uninformative."""
    if all(rows[name]['abpc'] == (0., 0.) for name in (method, other_method)):
        return 'uniform'
    if all(metrics[key] == (0., 0.) for key in ('aopc_morf', 'abpc')):
        return 'identical'
    signs = []
    for key in ('aopc_morf', 'abpc'):
        mean, half = metrics[key]
        signs.append(1 if mean - half > 0 else -1 if mean + half < 0 else 0)
    if 1 in signs and -1 in signs:
        return 'mixed'
    return 'better' if 1 in signs else 'worse' if -1 in signs else 'no difference'


def claims(summary):
    """Plain-words reading of the paired differences for the paper's two claims, derived from the numbers."""
    def comparisons(names):
        found = []
        for name in names:
            if name not in summary:
                continue
            rows = summary[name]['methods']
            for key, metrics in summary[name]['differences'].items():
                composite, _, rest = key.partition(': ')
                other = rest.rpartition(' - ')[2]
                verdict = classify(metrics, rows, method_key(composite, 'fused'), method_key(composite, other))
                found.append((name, composite, other, verdict, metrics))
        return found

    def tally(found, other=None):
        """(better, worse or mixed, informative) over the comparisons with ``other`` (all if None)."""
        kinds = [item[3] for item in found if other in (None, item[2]) and item[3] != 'uniform']
        return (sum(kind == 'better' for kind in kinds), sum(kind in ('worse', 'mixed') for kind in kinds),
                len(kinds))

    def reading(better, worse):
        if better and not worse:
            return 'support it'
        return 'do not support it' if worse >= better else 'support it in part'

    text = ['## What the numbers say about the paper\'s claims', '',
            'Each line compares fused with another handling on the same images, by AOPC (MoRF) and ABPC: '
            '*better*/*worse* where at least one differs beyond its 95% interval and the other does not go the '
            'other way, *mixed* where they disagree, *identical* where both handlings gave the same numbers on every '
            'image, *uniform* where both heatmaps are uniform (a Flat rule on a fully-connected first layer spreads '
            'relevance evenly over all pixels), which says nothing about BatchNorm and is left out of the counts.', '']
    groups = {1: ('mnist-cnn-bn', 'cifar10-vgg-bn'), 2: ('mnist-mlp-bn', 'cifar10-vgg-bn-fc')}
    found = {number: comparisons(names) for number, names in groups.items()}
    if found[1]:
        parts = []
        for other in ('unfused', 'naive'):
            better, worse, total = tally(found[1], other)
            parts.append(f'against {other} they {reading(better, worse)} (fused better in {better}, worse or mixed '
                         f'in {worse} of {total} comparisons)')
        text += [f'**Claim 1: fusing BatchNorm into convolutional layers gives more faithful LRP heatmaps.** On '
                 f'{", ".join(groups[1])}, {"; ".join(parts)}.', '']
    if found[1] and found[2]:
        _, conv_worse, conv_total = tally(found[1])
        fc_better, fc_worse, fc_total = tally(found[2])
        supported = fc_worse / max(fc_total, 1) > conv_worse / max(conv_total, 1)
        text += [f'**Claim 2: fully-connected + BatchNorm combinations stay a problem.** On {", ".join(groups[2])}, '
                 f'fused is better in {fc_better} and worse or mixed in {fc_worse} of {fc_total} informative '
                 f'comparisons, against {conv_worse} of {conv_total} on the convolutional models: the numbers '
                 f'{"support it" if supported else "do not support it"} (fusion is '
                 f'{"more" if supported else "not more"} of a problem with fully-connected BatchNorm here).', '']
    for number in groups:
        for name, composite, other, kind, metrics in found[number]:
            cells = '; '.join(f'{label} {metrics[key][0]:+.3f} ± {metrics[key][1]:.3f}'
                              for key, label in (('aopc_morf', 'AOPC'), ('abpc', 'ABPC')))
            text.append(f'- {name}, {DISPLAY_NAMES.get(composite, composite)}, fused - {other}: {cells} ({kind})')
        text.append('')
    return text


def write_report(summary, args, command, out):
    '''Write faithfulness.md and faithfulness.json.'''
    host = machine(f'device {args.device}', f'{args.world_size} process(es)')
    date = today()
    lines = header('Faithfulness of LRP under three BatchNorm handlings', command, host, date) + [
        f'- images: the first {args.images} test images per dataset (CIFAR-10: evenly spread over the classes), '
        'explaining the predicted class',
        f'- perturbation: {args.patch_size}x{args.patch_size} patches, {args.patches_per_step} per step, replaced by '
        f'{args.baseline}; target logit after each step',
        '- AOPC (MoRF): mean logit drop with the most relevant patches removed first (higher = more faithful); '
        'AOPC (LeRF): the same, least relevant first (lower = better); ABPC: mean of LeRF - MoRF curves (higher = '
        'better); conservation: (sum of relevance - logit) / |logit|. Means ± 95% confidence half-width.',
        '- handlings: ' + '; '.join(f'`{name}`: {HANDLINGS[name].description}' for name in args.handlings),
        '',
    ]
    lines += claims(summary)
    for name, model_summary in summary.items():
        lines += [f'## {name}', '',
                  f'{model_summary["images"]} images, accuracy on them '
                  f'{100 * model_summary["accuracy_on_images"]:.1f}%',
                  '', '| method | handling | AOPC (MoRF) | AOPC (LeRF) | ABPC | conservation |',
                  '| --- | --- | --- | --- | --- | --- |']
        for method, row in model_summary['methods'].items():
            composite, _, handling = method.partition('/')
            label = DISPLAY_NAMES.get(composite, composite)
            lines.append(f'| {label} | {handling or "-"} | {format_ci(row["aopc_morf"])} | '
                         f'{format_ci(row["aopc_lerf"])} | {format_ci(row["abpc"])} | '
                         f'{format_ci(row["conservation"])} |')
        if model_summary['differences']:
            lines += ['', '| paired difference | AOPC (MoRF) | ABPC |', '| --- | --- | --- |']
            for key, metrics in model_summary['differences'].items():
                composite, _, rest = key.partition(': ')
                lines.append(f'| {DISPLAY_NAMES.get(composite, composite)}: {rest} | '
                             f'{format_ci(metrics["aopc_morf"])} | {format_ci(metrics["abpc"])} |')
        lines.append('')
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{args.tag}.md').write_text('\n'.join(lines))
    (out / f'{args.tag}.json').write_text(json.dumps(
        {'command': command, 'machine': host, 'date': date, 'summary': summary}, indent=1) + '\n')


def write_figures(results, data, args, composite='epsilon-plus-flat', rows=4):
    '''The mean MoRF curves of every model, and per dataset a heatmap grid of its BatchNorm conv model.'''
    curves = {}
    for name, model_results in results.items():
        methods = model_results['methods']
        curves[name] = {label: methods[method]['morf_curve'] for label, method in (
            *((handling, method_key(composite, handling)) for handling in args.handlings),
            *((method, method) for method in BASELINE_METHODS)) if method in methods}
    curves_figure(curves, args.out / f'{args.tag}-curves.png',
                  title=f'Mean MoRF perturbation curves ({DISPLAY_NAMES[composite]} for the handlings)')
    for dataset, name in (('mnist', 'mnist-cnn-bn'), ('cifar10', 'cifar10-vgg-bn')):
        if name not in args.models:
            continue
        model = pretrained(name, device=args.device)
        images = data[dataset][0][:rows].to(args.device)
        targets = predicted_classes(model, images)
        relevance = relevance_by_handling(model, images, targets, lambda: make_composite(composite),
                                          ('naive', 'unfused', 'fused'), progress=False)
        classes = CIFAR10_CLASSES if dataset == 'cifar10' else MNIST_CLASSES
        heatmap_grid(images, relevance, args.out / f'{args.tag}-heatmaps-{dataset}.png',
                     row_labels=[classes[target] for target in targets.tolist()],
                     title=f'{name}, {DISPLAY_NAMES[composite]}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated model names')
    parser.add_argument('--composites', default=','.join(COMPOSITES), help='comma-separated composite names')
    parser.add_argument('--handlings', default=','.join(HANDLINGS), help='comma-separated BatchNorm handlings')
    parser.add_argument('--images', type=int, default=1000, help='test images per dataset')
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--patch-size', type=int, default=4)
    parser.add_argument('--patches-per-step', type=int, default=4)
    parser.add_argument('--baseline', default='0', help='a number, or noise (uniform in [0, 1], fixed per image)')
    parser.add_argument('--batch-size', type=int, default=100, help='images per attribution batch')
    parser.add_argument('--eval-batch-size', type=int, default=1000, help='perturbed images per forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', type=Path, default=RESULTS)
    parser.add_argument('--tag', default='faithfulness', help='file name of the tables (without extension)')
    parser.add_argument('--no-figures', action='store_true')
    args = parser.parse_args(argv)
    args.models = args.models.split(',')
    args.composites = args.composites.split(',')
    args.handlings = args.handlings.split(',')
    for name in args.models:
        dataset_of(name)
    for composite in args.composites:
        make_composite(composite)
    for handling in args.handlings:
        if handling not in HANDLINGS:
            parser.error(f'unknown handling {handling!r}; choose from {", ".join(HANDLINGS)}')
    return args


def main(argv=None):
    args = parse_args(argv)
    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    rank, args.world_size = 0, 1
    if distributed:
        backend = 'nccl' if args.device.startswith('cuda') else 'gloo'
        dist.init_process_group(backend)
        rank, args.world_size = dist.get_rank(), dist.get_world_size()
        if backend == 'nccl':
            args.device = f'cuda:{int(os.environ.get("LOCAL_RANK", rank))}'
            torch.cuda.set_device(args.device)

    data = {}
    results = {}
    with tqdm(total=len(args.models) * (len(BASELINE_METHODS) + len(args.composites) * len(args.handlings)),
              desc='faithfulness', disable=rank != 0) as progress:
        for name in args.models:
            dataset = dataset_of(name)
            if dataset not in data:
                data[dataset] = load_tensors(dataset, args.data_root, train=False, limit=args.images,
                                             progress=rank == 0)
            images, labels = data[dataset]
            image_ids = torch.arange(len(images))[rank::args.world_size]
            shard = evaluate_model(name, images[image_ids].to(args.device), labels[image_ids], image_ids, args,
                                   progress)
            if distributed:
                shards = [None] * args.world_size
                dist.all_gather_object(shards, shard)
            else:
                shards = [shard]
            results[name] = merge(shards)

    if rank == 0:
        launcher = f'torchrun --nproc_per_node={args.world_size}' if distributed else 'python'
        command = command_line(argv, launcher)
        summary = summarise(results)
        write_report(summary, args, command, args.out)
        if not args.no_figures:
            write_figures(results, data, args)
        print(f'wrote {args.out / (args.tag + ".md")}')
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
