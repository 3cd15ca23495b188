"""The workdir contract (docs/interfaces.md): checkpoints and the files a run leaves, read by training and evaluation."""
