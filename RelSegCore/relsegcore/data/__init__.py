"""Training data: dataset readers (``readers``), the HU -> model-input pipeline shared with
inference (``intensity``), the non-COVID recipe and ``--data KIND:PATH`` (``general``) and batched
augmentation on the training device (``augment``). Import the submodules directly."""
