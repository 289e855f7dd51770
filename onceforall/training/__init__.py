"""Training: schedules and the shrinking recipe, the training loop, and how a stage runs on
many processes (torchrun ranks, a Kubeflow Trainer TrainJob) with durable checkpoints."""
