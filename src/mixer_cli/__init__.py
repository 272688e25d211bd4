"""mixer: pre-train, fine-tune and evaluate MLP-Mixer models; reproduce Tolstikhin et al. (2021)."""

__version__ = "0.1.0"
