"""The package version, and the checkpoint key that records which version wrote a checkpoint."""

__version__ = "0.1.0"

#: Checkpoint entry holding the lt_finetune version that wrote it (absent in checkpoints written before it existed).
VERSION_KEY = "lt_finetune_version"
