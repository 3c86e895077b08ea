'''Train the study's models from a seed and ship their weights.

Writes ``zennit_bnfuse/evaluation/weights/<name>.pt`` (seed 0) or ``<name>-seed<k>.pt`` (the state_dict of the
shipped architecture, input normalisation folded into the first layer) and records the measured test accuracy per
model and seed in ``benchmarks/results/models.md`` (and ``models.json``), with the command, machine and date.

Every run uses one recipe per model family (SGD with Nesterov momentum, one-cycle schedule, bfloat16 mixed precision
with channels-last tensors by default, which is 2.3x faster on this CPU than float32; the weights stay float32).

Examples::

    python benchmarks/train.py --model all --seeds 0,1,2 --data-root ../shared/data
    python benchmarks/train.py --model cifar10-vgg-bn --seeds 1 --device cuda
    python benchmarks/train.py --model cifar10-vgg --seeds 2 --device cuda --out runs/   # weights + record there
    python benchmarks/train.py --import-from runs/   # ship them: weights into the package, rows into models.md

With ``--precision float32`` on CUDA, TF32 is switched off, so float32 means float32 there too.
'''
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zennit_bnfuse.evaluation.data import default_data_root, load_tensors
from zennit_bnfuse.evaluation.models import MODELS, build, dataset_of, fold_normalization, weights_path

from provenance import command_line, device_description, machine, strict_float32, today

RESULTS = Path(__file__).parent / 'results'
# epochs and peak learning rate per model family (SGD, Nesterov momentum, one-cycle schedule)
RECIPES = {
    ('mnist', 'cnn'): {'epochs': 6, 'lr': 0.05},
    ('mnist', 'mlp'): {'epochs': 12, 'lr': 0.05},
    ('cifar10', 'vgg'): {'epochs': 25, 'lr': 0.05},
    ('cifar10', 'preact'): {'epochs': 30, 'lr': 0.1},
}
PRECISIONS = {'bfloat16': torch.bfloat16, 'float32': None}


def augment(images, generator):
    '''CIFAR-10 augmentation on a batch: random crop with 4 pixels of reflect padding and random horizontal flip.'''
    count, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4), mode='reflect')
    rows = torch.randint(0, 9, (count,), generator=generator)
    cols = torch.randint(0, 9, (count,), generator=generator)
    grid_rows = rows[:, None] + torch.arange(height)[None]
    grid_cols = cols[:, None] + torch.arange(width)[None]
    batch = torch.arange(count)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    cropped = padded[batch, channel, grid_rows[:, None, :, None], grid_cols[:, None, None, :]]
    flip = torch.rand(count, generator=generator) < .5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def accuracy(model, images, labels, batch_size=1000, device='cpu'):
    '''Top-1 accuracy of ``model`` on the given tensors.'''
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            output = model(images[start:start + batch_size].to(device))
            correct += (output.argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def train(name, data_root, epochs=None, lr=None, batch_size=128, seed=0, device='cpu', download=False,
          precision='bfloat16'):
    '''Train model ``name`` from ``seed``; return the shipped (normalisation-folded) model and its measurements.

    ``precision`` is ``'bfloat16'`` (autocast mixed precision, channels-last) or ``'float32'``.'''
    dataset = dataset_of(name)
    recipe = RECIPES[(dataset, MODELS[name][1])]
    epochs = epochs or recipe['epochs']
    lr = lr or recipe['lr']
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_tensors(dataset, data_root, train=True, download=download)
    test_images, test_labels = load_tensors(dataset, data_root, train=False, download=download)

    autocast_dtype = PRECISIONS[precision]
    if autocast_dtype is None:
        strict_float32()
    memory_format = torch.channels_last if autocast_dtype is not None and dataset == 'cifar10' else \
        torch.contiguous_format
    model = build(name, normalize=True).to(device, memory_format=memory_format).train()
    decay = [param for param in model.parameters() if param.ndim > 1]
    no_decay = [param for param in model.parameters() if param.ndim <= 1]
    optimizer = torch.optim.SGD([{'params': decay, 'weight_decay': 5e-4}, {'params': no_decay, 'weight_decay': 0}],
                                lr=lr, momentum=.9, nesterov=True)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.time()
    with tqdm(total=steps, desc=f'training {name}') as progress:
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for batch in order.split(batch_size):
                input = images[batch]
                if dataset == 'cifar10':
                    input = augment(input, generator)
                input = input.to(device, memory_format=memory_format)
                with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    loss = F.cross_entropy(model(input), labels[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
                if progress.n % 50 == 0:
                    progress.set_postfix(epoch=epoch + 1, loss=f'{loss.item():.3f}')
    seconds = time.time() - start
    shipped = fold_normalization(model.cpu().to(memory_format=torch.contiguous_format).eval(), name)
    return shipped, {
        'model': name,
        'test_accuracy': accuracy(shipped, test_images, test_labels),
        'test_images': len(test_images),
        'epochs': epochs,
        'peak_lr': lr,
        'batch_size': batch_size,
        'seed': seed,
        'precision': precision,
        'train_seconds': round(seconds),
        'parameters': sum(param.numel() for param in shipped.parameters()),
    }


def described(record, command, device):
    '''``record`` with the command, machine and date that made it.'''
    return {**record, 'command': command, 'machine': machine(device_description(device)), 'date': today()}


def write_results(records):
    '''Merge ``records`` (each :py:func:`described`) into models.json and rewrite models.md from it.'''
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / 'models.json'
    entries = json.loads(store.read_text()) if store.is_file() else {}
    for record in records:
        entries[f'{record["model"]}/seed{record["seed"]}'] = record
    store.write_text(json.dumps(entries, indent=2) + '\n')
    lines = [
        '# Shipped models: measured test accuracy',
        '',
        'Written by `benchmarks/train.py`; each row is one training run from the given seed, evaluated on the full '
        'test split of `../shared/data` (MNIST test set; the JPEG copy of the CIFAR-10 test set) with the shipped '
        'weights (input normalisation folded into the first layer). The train time is wall-clock time on the machine '
        'named below for the run; runs that shared a machine ran side by side.',
        '',
        '| model | seed | test accuracy | epochs | precision | parameters | weight file | train time | date |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    rows = sorted(entries.values(), key=lambda entry: (list(MODELS).index(entry['model']), entry['seed']))
    for entry in rows:
        path = weights_path(entry['model'], entry['seed'])
        size = path.stat().st_size / 1e6 if path.is_file() else float('nan')
        lines.append(f'| {entry["model"]} | {entry["seed"]} | {100 * entry["test_accuracy"]:.2f}% | '
                     f'{entry["epochs"]} | {entry.get("precision", "float32")} | {entry["parameters"]:,} | '
                     f'{size:.2f} MB | '
                     f'{entry["train_seconds"]} s | {entry["date"]} |')
    lines += ['', 'Commands and machines:', '']
    for entry in rows:
        lines.append(f'- {entry["model"]}, seed {entry["seed"]}: `{entry["command"]}` on {entry["machine"]}')
    (RESULTS / 'models.md').write_text('\n'.join(lines) + '\n')


def import_runs(folder):
    '''Ship the runs that ``--out folder`` wrote: copy each ``<weights>.pt`` that has a ``<weights>.json`` record
    beside it into the package and merge the records into models.md; return the records.

    Raises
    ------
    FileNotFoundError
        If ``folder`` holds no record, or a record without its weights.
    ValueError
        If a weights file's name is not the one its model and seed ship as.
    '''
    records = []
    for file in sorted(Path(folder).glob('*.json')):
        record = json.loads(file.read_text())
        weights = file.with_suffix('.pt')
        if not weights.is_file():
            raise FileNotFoundError(f'{file} has no weights beside it ({weights.name})')
        target = Path(str(weights_path(record['model'], record['seed'])))
        if weights.name != target.name:
            raise ValueError(f'{weights} holds {record["model"]} seed {record["seed"]}, which ships as {target.name}')
        shutil.copyfile(weights, target)
        records.append(record)
    if not records:
        raise FileNotFoundError(f'no training records (<weights>.json beside <weights>.pt) in {folder}')
    write_results(records)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='all', help=f'one of {", ".join(MODELS)}, or all')
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--download', action='store_true', help='let torchvision download missing data')
    parser.add_argument('--epochs', type=int, help='override the recipe\'s epochs')
    parser.add_argument('--lr', type=float, help='override the recipe\'s peak learning rate')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--seeds', default='0', help='comma-separated training seeds (default 0)')
    parser.add_argument('--precision', choices=PRECISIONS, default='bfloat16',
                        help='bfloat16 mixed precision (default) or float32')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--out', type=Path, help='write weights and a record per run here instead of shipping them '
                        '(default: into the package, with a row in models.md)')
    parser.add_argument('--import-from', type=Path, metavar='FOLDER',
                        help='ship the runs that --out FOLDER wrote (e.g. on another machine) and stop')
    args = parser.parse_args(argv)
    if args.import_from:
        for record in import_runs(args.import_from):
            print(f'shipped {record["model"]} seed {record["seed"]} ({100 * record["test_accuracy"]:.2f}%)')
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(MODELS) if args.model == 'all' else args.model.split(',')
    for name in names:
        dataset_of(name)
    seeds = [int(seed) for seed in args.seeds.split(',')]
    command = command_line(argv)
    for seed in seeds:
        for name in names:
            model, record = train(name, args.data_root, args.epochs, args.lr, args.batch_size, seed, args.device,
                                  args.download, args.precision)
            path = weights_path(name, seed)
            path = args.out / path.name if args.out else Path(str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            print(f'{name} seed {seed}: test accuracy {100 * record["test_accuracy"]:.2f}% -> {path}')
            record = described(record, command, args.device)
            if args.out is None:
                write_results([record])
            else:
                path.with_suffix('.json').write_text(json.dumps(record, indent=2) + '\n')


if __name__ == '__main__':
    main()
