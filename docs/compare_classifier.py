"""The conditional VAE as a classifier against a plain classifier of the same size, on MNIST.

Trains `mnist-vae --conditional` and an MLP with the VAE encoder's layers (784 -> 500 ELU ->
500 tanh -> 10, dropout 0.1, Adam 1e-3, batch 128) for the same epochs on the same images, and
prints both test accuracies. Usage: python docs/compare_classifier.py EPOCHS DIM_Z OUT_DIR
"""

import csv
import sys
from pathlib import Path

import torch
from torch import nn

import mnist_vae

epochs, dim_z, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
mnist_vae.train(output=out / "cvae", conditional=True, dim_z=dim_z, num_epochs=epochs, device="cpu",
                overwrite=True, log=lambda line: None)
with open(out / "cvae" / "metrics.csv", newline="") as file:
    accuracy = float(list(csv.DictReader(file))[-1]["test_accuracy"])  # the label of highest ELBO
print(f"conditional VAE, dim_z {dim_z}, {epochs} epochs: test accuracy {accuracy:.4f}")


def pixels(images):
    return torch.tensor(images.reshape(len(images), -1), dtype=torch.float32).div_(255)


torch.manual_seed(0)
data = mnist_vae.datasets.load("mnist")
train_x, test_x = pixels(data.train_images), pixels(data.test_images)
train_y, test_y = torch.from_numpy(data.train_labels).long(), torch.from_numpy(data.test_labels).long()
classifier = nn.Sequential(nn.Linear(784, 500), nn.ELU(), nn.Dropout(0.1), nn.Linear(500, 500), nn.Tanh(),
                           nn.Dropout(0.1), nn.Linear(500, 10))
optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
for epoch in range(epochs):
    classifier.train()
    for batch in torch.randperm(len(train_x)).split(128):
        loss = nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
classifier.eval()
with torch.no_grad():
    accuracy = (classifier(test_x).argmax(1) == test_y).float().mean().item()
print(f"plain classifier of the encoder's size, {epochs} epochs: test accuracy {accuracy:.4f}")
