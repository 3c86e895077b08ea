'''Fuse the BatchNorms of a torchvision ResNet-50 (random weights, no download) and print the fusion report.'''
import torch
import torchvision

from zennit_bnfuse import fuse

model = torchvision.models.resnet50(weights=None).eval()
fused, report = fuse(model)
print(report)

input = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    error = (fused(input) - model(input)).abs().max() / model(input).abs().max()
print(f'\nmax relative logit difference fused vs original: {error:.2e}')
