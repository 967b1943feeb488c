"""The sparsity toolkit (PAPER.md): CETT calibration of per-layer thresholds, neuron profiling,
activation predictors, the hardware-affinity metrics, and the study that ties them together."""
