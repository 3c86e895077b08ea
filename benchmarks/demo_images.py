'''Write the demo images shipped in the package: the first 6 MNIST test images and one CIFAR-10 test image of each
of 6 classes, as PNG files ``zennit_bnfuse/evaluation/demo/<dataset>-<index>-<label>.png`` (a few KB in all).

    python benchmarks/demo_images.py --data-root ../shared/data
'''
import argparse
from pathlib import Path

from torchvision.transforms.functional import to_pil_image

from zennit_bnfuse.evaluation.data import default_data_root, load_tensors

DEMO = Path(__file__).parent.parent / 'zennit_bnfuse' / 'evaluation' / 'demo'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', default=str(default_data_root()))
    parser.add_argument('--count', type=int, default=6)
    args = parser.parse_args(argv)
    DEMO.mkdir(parents=True, exist_ok=True)
    images, labels = load_tensors('mnist', args.data_root, train=False, limit=args.count, progress=False)
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        to_pil_image(image).save(DEMO / f'mnist-{index}-{label}.png', optimize=True)
    # one image per class: the CIFAR-10 copy is sorted by class, 1000 images each
    images, labels = load_tensors('cifar10', args.data_root, train=False, limit=10, progress=False)
    for index, (image, label) in enumerate(list(zip(images, labels.tolist()))[:args.count]):
        to_pil_image(image).save(DEMO / f'cifar10-{index}-{label}.png', optimize=True)
    print(f'wrote {len(list(DEMO.glob("*.png")))} images to {DEMO}')


if __name__ == '__main__':
    main()
