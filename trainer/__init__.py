"""Models, losses, samplers and the DeeperCluster training loop."""
