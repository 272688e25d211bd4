"""The engine: the Lightning pieces every training command runs through (fit.py): LightningModule,
DataModule, batch plan, losses, mixup, optimiser and schedule factories, Trainer, pre-emption."""
