"""Training: heads and losses, samplers, augmentation, the DeeperCluster training loop and evaluation.

The backbones are in :mod:`dataengine.models`, shared with the embed stage.
"""
