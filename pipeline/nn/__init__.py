"""The network and its data: the device, the model registry, datasets and the calibration
subset, which layers are prunable and what they cost, forward passes and accuracy, training."""
