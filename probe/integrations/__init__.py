"""Two-line attachments for the trainers people use.

- :mod:`rankguard.probe.integrations.huggingface`: ``RankguardCallback`` for the Hugging Face
  ``Trainer`` (a ``transformers.TrainerCallback``);
- :mod:`rankguard.probe.integrations.lightning`: ``RankguardCallback`` for Lightning (a
  ``lightning.pytorch.Callback``).

Each makes one ``probe.step`` per optimizer step whatever the gradient accumulation, with
the true (unscaled) loss and the trainer's own step numbering; hands the probe the real
optimizer behind the trainer's wrapper; lets every rank of the trainer's own DDP/FSDP run
its probe (rank 0 ships); and closes the probe when training ends. A plain loop, accelerate
and ``torch.compile`` need no integration: ``Probe(model, optimizer, ...)`` takes them as
they are. Importing this package imports neither framework.
"""
