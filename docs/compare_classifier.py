"""The conditional VAE as a classifier against a plain classifier of the same size, on MNIST.

Trains `mnist-vae --conditional` and an MLP with the VAE encoder's layers (784 -> 500 ELU ->
500 tanh -> 10, dropout 0.1, Adam 1e-3, batch 128) for the same epochs on the same images, and
prints both test accuracies. Usage: python docs/compare_classifier.py EPOCHS DIM_Z OUT_DIR
"""

import sys

import torch
from torch import nn

from mnist_vae.config import Config
from mnist_vae.train import load_tensors, train

epochs, dim_z, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config = Config(conditional=True, dim_z=dim_z, num_epochs=epochs, output=f"{out}/cvae", device="cpu")
row = train(config, overwrite=True, log=lambda *a: None)
print(f"conditional VAE, dim_z {dim_z}, {epochs} epochs: test accuracy {row['test_accuracy']:.4f}")

torch.manual_seed(0)
tensors = load_tensors(config, torch.device("cpu"), log=lambda *a: None)
classifier = nn.Sequential(nn.Linear(784, 500), nn.ELU(), nn.Dropout(0.1), nn.Linear(500, 500), nn.Tanh(),
                           nn.Dropout(0.1), nn.Linear(500, 10))
optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
for epoch in range(epochs):
    classifier.train()
    for batch in torch.randperm(len(tensors.train)).split(128):
        loss = nn.functional.cross_entropy(classifier(tensors.train[batch]), tensors.train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
classifier.eval()
with torch.no_grad():
    accuracy = (classifier(tensors.test).argmax(1) == tensors.test_y).float().mean().item()
print(f"plain classifier of the encoder's size, {epochs} epochs: test accuracy {accuracy:.4f}")
