'''Tests for the shipped models (zennit_bnfuse.evaluation.models) and data loading (zennit_bnfuse.evaluation.data).'''
import pytest
import torch

from zennit_bnfuse.evaluation.data import default_data_root, load_dataset, load_tensors
from zennit_bnfuse.evaluation.models import (
    INPUT_SHAPES, MODELS, build, dataset_of, fold_normalization, pretrained, weights_path,
)

from conftest import randomize_batch_norms

# the accuracy each shipped model must reach on the full test split
REQUIRED_ACCURACY = {'mnist-cnn-bn': .99, 'mnist-mlp-bn': .975, 'mnist-mlp': .975, 'cifar10-vgg-bn': .85,
                     'cifar10-preact-resnet': .85}
# the training seeds whose weights are shipped (benchmarks/results/models.md)
SHIPPED_SEEDS = {name: (0, 1, 2) for name in MODELS}
HAS_DATA = (default_data_root() / 'MNIST').is_dir() and (default_data_root() / 'CIFAR10-JPEG').is_dir()


@pytest.mark.parametrize('name, seed', [(name, seed) for name in sorted(MODELS) for seed in SHIPPED_SEEDS[name]])
def test_pretrained_loads_small_and_in_eval_mode(name, seed):
    model = pretrained(name, seed=seed)
    assert not model.training
    assert weights_path(name, seed).stat().st_size < 5e6
    assert not any(type(module).__name__ == 'Normalize' for module in model.modules())
    output = model(torch.rand(2, *INPUT_SHAPES[dataset_of(name)]))
    assert output.shape == (2, 10)


@pytest.mark.skipif(not HAS_DATA,
                    reason=f'needs MNIST and CIFAR10-JPEG under {default_data_root()} (set ZENNIT_BNFUSE_DATA)')
@pytest.mark.parametrize('name', sorted(REQUIRED_ACCURACY))
def test_shipped_accuracy(name):
    images, labels = load_tensors(dataset_of(name), train=False, progress=False)
    model = pretrained(name)
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(dim=1) for batch in images.split(1000)])
    assert (predictions == labels).double().mean().item() >= REQUIRED_ACCURACY[name]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_fold_normalization_exact(name):
    torch.manual_seed(0)
    model = randomize_batch_norms(build(name, normalize=True).double())
    shipped = fold_normalization(model, name)
    first = next(module for module in shipped.children() if hasattr(module, 'weight'))
    assert first.weight.dtype == torch.float64 and 'normalize' not in dict(shipped.named_children())
    input = torch.rand(3, *INPUT_SHAPES[dataset_of(name)], dtype=torch.float64)
    torch.testing.assert_close(shipped(input), model(input), rtol=0, atol=1e-10)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'; choose one of mnist-cnn-bn"):
        pretrained('resnet')
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset('svhn')


def test_missing_data_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf'mnist \(test\) not found under {tmp_path}.*--data-root'):
        load_dataset('mnist', tmp_path)


def test_seeds_are_different_training_runs_and_missing_ones_say_how_to_train():
    first, second = pretrained('mnist-cnn-bn', seed=0), pretrained('mnist-cnn-bn', seed=1)
    assert not torch.equal(first.conv1.weight, second.conv1.weight)
    with pytest.raises(FileNotFoundError, match=r'--model cifar10-vgg --seeds 7'):
        pretrained('cifar10-vgg', seed=7)
