"""Train a manpp local model with PyTorch Lightning (manual optimization).

A local model runs K forward/backward passes per training step, one per gradient-isolated
module, so it cannot hand Lightning a single loss to back-propagate. Instead the LightningModule
switches to *manual optimization* and gives ``train_step`` Lightning's ``manual_backward`` as its
``backward`` hook: each of the K local losses goes through ``manual_backward`` (so mixed-precision
loss scaling and strategy hooks apply to every one), and one optimizer step follows.

The pattern, in ``training_step``::

    opt = self.optimizers()
    opt.zero_grad()
    result = self.model.train_step(x, y, backward=self.manual_backward)   # K local backwards
    opt.step()

Run it (CPU, a few epochs on scikit-learn's digits, no download)::

    python examples/lightning_module.py --epochs 5 --k 2

Needs ``pip install 'manpp[lightning]'`` (Lightning >= 2.2). Lightning is imported only here:
``manpp`` itself does not depend on it.

Notes:

* ``precision="16-mixed"`` works as is: ``manual_backward`` scales each local loss with the same
  gradient scaler and ``opt.step()`` unscales once (and skips the step on overflow).
* This example is single-device. Lightning's DDP strategy expects one backward per forward of the
  wrapped module; for multi-process training use manpp's own launcher
  (``torchrun ... -m manpp train``, see ``manpp.base.distributed``), which all-reduces the gradients of
  all K modules after the local step.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader

import manpp


class LocalLearningModule(L.LightningModule):
    """A LightningModule around a :class:`manpp.LocalModel`.

    ``model`` is any local model (``manpp.local_model(...)`` or ``manpp.wrap(...)``). Training uses
    SGD over ``model.parameters_to_optimize()`` (backbone, auxiliary networks, MAN++ scales; not
    the frozen EMA copies), optionally with a cosine learning-rate schedule stepped once per
    training step. ``self(x)`` and validation use the backbone alone, as at deployment.
    """

    def __init__(self, model: manpp.LocalModel, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, cosine: bool = True):
        super().__init__()
        self.model = model
        self.automatic_optimization = False  # train_step runs the K backward passes itself
        self.save_hyperparameters(ignore=["model"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the backbone alone, without the auxiliary networks."""
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        # K local forward/backward passes; each backward goes through Lightning.
        result = self.model.train_step(x, y, backward=self.manual_backward)
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        # result.losses: one detached scalar per module, the last is the task (cross-entropy) loss.
        for j, loss in enumerate(result.losses):
            self.log(f"train/loss_{j}", loss, on_step=True, on_epoch=True, batch_size=len(y))
        task_loss = result.losses[-1]
        self.log("train/loss", task_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return {"loss": task_loss, "losses": result.losses}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.log("val/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("val/loss", loss, on_epoch=True, batch_size=len(y))
        return accuracy

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(self.model.parameters_to_optimize(), lr=hp.lr, momentum=hp.momentum,
                              nesterov=True, weight_decay=hp.weight_decay)
        if not hp.cosine:
            return opt
        # Stepped by hand in training_step (manual optimization steps no scheduler by itself).
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_model(arch: str = "resnet8", method: str = "manpp", k: int = 2, objective: str = "dgl",
                in_channels: int = 1, num_classes: int = 10, image_size: int = 32, **options) -> manpp.LocalModel:
    """A CIFAR-style ResNet cut into ``k`` local modules trained by ``method``.

    ``options`` go to :func:`manpp.local_model` (``ema_momentum``, ``recompute_ema``, ...).
    """
    net = manpp.build_backbone(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return manpp.local_model(net, method=method, k=k, objective=objective, image_size=image_size, **options)


def digits_loaders(batch_size: int = 64, augment: bool = True) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders for scikit-learn's digits (1x32x32, 10 classes, offline)."""
    from manpp.data import build_datasets

    train, test, _ = build_datasets("digits", augment=augment)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(test, batch_size=256))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--method", default="manpp", help="dgl, infopro, man, manpp, e2e, ...")
    p.add_argument("--k", type=int, default=2, help="number of gradient-isolated modules")
    p.add_argument("--objective", default="dgl")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, test_loader = digits_loaders(args.batch_size)
    module = LocalLearningModule(build_model(args.arch, args.method, args.k, args.objective), lr=args.lr)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5)
    trainer.fit(module, train_loader, test_loader)
    accuracy = trainer.validate(module, test_loader, verbose=False)[0]["val/acc"]
    print(f"{args.method} K={args.k} {args.arch}: final test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
