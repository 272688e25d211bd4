"""Training: LightningModule, DataModule, optimiser/schedule factories and the Trainer."""
