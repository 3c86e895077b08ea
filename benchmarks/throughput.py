'''Explanations per second: LRP over the CIFAR-10 test set, and over resnet50 at 224x224.

Workloads:

- ``cifar10``: the shipped CIFAR-10 models (``--cifar10-models``) over the test set (``--images``, all 10,000 by
  default), each image explained for its label, in batches of ``--batch``;
- ``resnet50``: torchvision's resnet50 (random weights, BatchNorm statistics randomised as in the zoo) on
  ``--resnet50-images`` random 224x224 images with random targets, in batches of ``--resnet50-batch``.

Methods: the plain input gradient of the model (the reference), ``CompositeLRP(EpsilonPlusFlat)`` on its default
engine (SinglePass) and on Zennit's hooks, ``FusedLRP()`` on its default engine and on Captum's hooks. Every batch
is explained by each method in turn (round robin, so a machine whose speed drifts moves all methods alike), each call
timed with the device synchronised before and after; a method's rate is the images over its summed time, and its
ratio is its summed time over the gradient's in the same run. One batch per method first, untimed (it builds the
prepared copies). On CUDA also each method's peak memory allocated above what was allocated before its calls (the
largest over the batches). Writes ``benchmarks/results/<tag>.md`` and ``.json``.

    python benchmarks/throughput.py --devices cuda --data-root ../shared/data
'''
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.models import pretrained

from provenance import command_line, header, machine, strict_float32, today
from speed import input_gradient, peak_memory_end, peak_memory_start, randomized, synchronize

RESULTS = Path(__file__).parent / 'results'
GRADIENT = 'gradient'
# row name -> function (model) -> attribution object with Captum's attribute()
METHODS = {
    'CompositeLRP(EpsilonPlusFlat), default engine': lambda model: CompositeLRP(model, EpsilonPlusFlat()),
    'CompositeLRP(EpsilonPlusFlat, engine=\'zennit\')': lambda model: CompositeLRP(
        model, EpsilonPlusFlat(), engine='zennit'),
    'FusedLRP(), default engine': lambda model: FusedLRP(model),
    'FusedLRP(engine=\'captum\')': lambda model: FusedLRP(model, engine='captum'),
}


def attribution_call(lrp):
    '''``(images, targets) -> relevance`` from ``lrp.attribute``.'''
    return lambda images, targets: lrp.attribute(images, target=targets)


def explainers(model):
    '''Each method's function ``(images, targets) -> relevance`` for ``model``, the gradient first.'''
    calls = {GRADIENT: lambda images, targets: input_gradient(model, images, targets)()}
    calls.update({name: attribution_call(make(model)) for name, make in METHODS.items()})
    return calls


def measure(model, images, targets, batch, device, desc):
    '''Summed seconds, peak memory (MB, CUDA only) and image count of each method over ``images`` in batches.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        In eval mode, on ``device``.
    images, targets: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` and ``(N,)``, on ``device``.
    batch: int
    device: :py:obj:`torch.device`
    desc: str
        For the progress bar.
    '''
    calls = explainers(model)
    for call in calls.values():  # warm-up: builds the prepared copies and the kernels' caches
        call(images[:batch], targets[:batch])
    synchronize(device)
    seconds = dict.fromkeys(calls, 0.0)
    memory = dict.fromkeys(calls, None)
    for start in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        chunk, chunk_targets = images[start:start + batch], targets[start:start + batch]
        for name, call in calls.items():
            baseline = peak_memory_start(device)
            began = time.perf_counter()
            call(chunk, chunk_targets)
            synchronize(device)
            seconds[name] += time.perf_counter() - began
            peak = peak_memory_end(device, baseline)
            if peak is not None:
                memory[name] = max(peak, memory[name] or 0.0)
    return {name: {'seconds': seconds[name], 'images': len(images), 'peak_mb': memory[name]} for name in calls}


def cifar10_workloads(args, device):
    '''``(label, model, images, targets, batch)`` for each CIFAR-10 model over the test set.'''
    images, labels = load_tensors('cifar10', args.data_root, train=False, download=args.download,
                                  limit=args.images)
    images, labels = images.to(device), labels.to(device)
    for name in args.cifar10_models.split(','):
        yield f'{name} (CIFAR-10 test set, 32x32)', pretrained(name, device), images, labels, args.batch


def resnet50_workload(args, device):
    '''``(label, model, images, targets, batch)`` for resnet50 on random 224x224 images.'''
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.resnet50_images, 3, 224, 224, generator=generator)
    targets = torch.randint(0, 1000, (args.resnet50_images,), generator=generator)
    yield ('resnet50 (random weights, 224x224)', randomized('resnet50').to(device), images.to(device),
           targets.to(device), args.resnet50_batch)


def write_report(results, command, args, host, date):
    '''The Markdown table and the raw results, as ``<tag>.md`` and ``<tag>.json`` in ``args.out``.'''
    lines = header('Explanations per second', command, host, date) + [
        '- each batch explained by every method in turn; a rate is the images over the method\'s summed time '
        '(device synchronised around each call), after one untimed batch per method; × gradient is the method\'s '
        'summed time over the plain input gradient\'s in the same run',
        '- CIFAR-10: each test image explained for its label; resnet50: random images and targets',
        '- peak memory: CUDA memory allocated above the level before each call, the largest over the batches '
        '(not measured on the CPU)',
        '',
        '| workload | device | batch | images | method | explanations/s | × gradient | peak memory |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for result in results:
        reference = result['rows'][GRADIENT]['seconds']
        for name, row in result['rows'].items():
            peak = '' if row['peak_mb'] is None else f'{row["peak_mb"]:.0f} MB'
            lines.append(f'| {result["workload"]} | {result["device"]} | {result["batch"]} | {row["images"]} | '
                         f'{name} | {row["images"] / row["seconds"]:.1f} | {row["seconds"] / reference:.2f} | '
                         f'{peak} |')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'{args.tag}.md').write_text('\n'.join(lines) + '\n')
    (args.out / f'{args.tag}.json').write_text(json.dumps(
        {'command': command, 'machine': host, 'date': date, 'results': results}, indent=1) + '\n')


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workloads', default='cifar10,resnet50', help='comma-separated: cifar10, resnet50')
    parser.add_argument('--devices', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--data-root', default=str(default_data_root()), help='where CIFAR10 or CIFAR10-JPEG lies')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR-10 if missing')
    parser.add_argument('--cifar10-models', default='cifar10-preact-resnet,cifar10-vgg-bn')
    parser.add_argument('--images', type=int, default=None, help='CIFAR-10 test images (default: all 10,000)')
    parser.add_argument('--batch', type=int, default=256, help='CIFAR-10 batch size')
    parser.add_argument('--resnet50-images', type=int, default=256)
    parser.add_argument('--resnet50-batch', type=int, default=32)
    parser.add_argument('--out', type=Path, default=RESULTS, help='folder for the tables')
    parser.add_argument('--tag', default=None, help='file name of the tables (default: throughput-<devices>)')
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(',')) - {'cifar10', 'resnet50'}
    if unknown:
        parser.error(f'unknown workloads: {", ".join(sorted(unknown))} (choose from cifar10, resnet50)')
    if args.tag is None:
        args.tag = 'throughput-' + args.devices.replace(',', '-')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    strict_float32()
    date, results = today(), []
    devices = [torch.device(device) for device in args.devices.split(',')]
    gpus = [torch.cuda.get_device_name(device) for device in devices if device.type == 'cuda']
    host = machine(*(gpus or ['no GPU']))
    for device in devices:
        workloads = []
        if 'cifar10' in args.workloads.split(','):
            workloads.append(cifar10_workloads(args, device))
        if 'resnet50' in args.workloads.split(','):
            workloads.append(resnet50_workload(args, device))
        for workload in workloads:
            for label, model, images, targets, batch in workload:
                rows = measure(model, images, targets, batch, device, f'{label} ({device})')
                results.append({'workload': label, 'device': str(device), 'batch': batch, 'rows': rows})
                # written as the table grows, so that a run cut short keeps what it measured
                write_report(results, command_line(argv), args, host, date)
    print((args.out / f'{args.tag}.md').read_text())


if __name__ == '__main__':
    main()
