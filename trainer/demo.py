"""The training stage of ``dataengine demo``: a short DeeperCluster run on the demo's shards."""

from __future__ import annotations

from typing import Any

from trainer.loop import TrainConfig, run_train


def demo_training(shards: str, out: str) -> dict[str, Any]:
    """Two short epochs of DeeperCluster (small convnet, 32-pixel crops, re-clustering every epoch)."""
    result = run_train(TrainConfig(shards=shards, out=out, mode="deepercluster", arch="small", image_size=32,
                                   epochs=2, reassign_every=1, levels=(4, 8), pca_dim=32, batch_size=64, workers=1,
                                   samples_per_epoch=768))
    last = result.metrics[-1] if result.metrics else {}
    return {"path": out, "checkpoint": result.checkpoint, "epochs": result.epochs, "steps": result.steps,
            "loss": round(float(last.get("loss", float("nan"))), 4),
            "nmi_previous": last.get("clustering", {}).get("nmi_previous")}
