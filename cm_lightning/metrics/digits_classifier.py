"""A small CNN for the 16x16 digits data, used as the feature network of an offline FID/IS.

Inception features are meaningless for 16x16 grayscale digits and need a download, so the
metrics use this classifier instead: its penultimate activations stand in for Inception's pool
features and its logits for Inception's class scores.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cm_lightning.data.digits import digits_tensor

WEIGHTS_PATH = Path(__file__).with_name("digits_classifier.pt")
IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 64
# The split is fixed independently of the training seed so that every retrained model is scored
# on the same held-out images.
_SPLIT_SEED = 0
_MAX_SHIFT_PX = 1.5


class DigitsClassifier(nn.Module):
    """CNN for 1x16x16 digits in [-1, 1]; `features` gives the 64-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        # Bias-free so that torch-fidelity's "logits_unbiased" (the Inception convention for IS)
        # are exactly the logits this network was trained with.
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _heldout_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified 80/20 split: (x_train, y_train, x_test, y_test)."""
    from sklearn.model_selection import train_test_split

    x, y = digits_tensor(IMAGE_SIZE)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=_SPLIT_SEED
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Sub-pixel shifts make the features robust to the slightly off-centre strokes that generative
    # models produce; border padding keeps the background at its real value of -1.
    shift = (torch.rand(x.shape[0], 2, generator=generator) * 2 - 1) * (_MAX_SHIFT_PX * 2 / IMAGE_SIZE)
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_digits_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Trains on the fixed 80% split; returns the model in eval mode and its held-out accuracy."""
    x_train, y_train, x_test, y_test = _heldout_split()
    generator = torch.Generator().manual_seed(seed)
    # Seeding the global RNG only inside the fork keeps the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    batch_size = 64
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(_random_shift(x_train[idx], generator)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model, _accuracy(model, x_test, y_test)


def load_pretrained_digits_classifier(path: str | Path = WEIGHTS_PATH) -> DigitsClassifier:
    """The shipped classifier, in eval mode and without gradients."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Digits classifier weights not found at {path}. Regenerate them with "
            "`python -m cm_lightning.metrics.digits_classifier`."
        )
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.requires_grad_(False)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description="Retrain the digits classifier used for FID/IS.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args()
    model, accuracy = train_digits_classifier(args.epochs, args.seed)
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy: {accuracy:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
