"""Where the trainer computes: on the CPU in fp32 a step is the plain modules' computation bit for bit (the device,
precision and data-parallel machinery add nothing); on CUDA (skipped without one) fp32 follows the CPU and bf16
autocast trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.labels import Labels

SIZE, ROWS = 32, 16


def _config(shards: str, out: str, **kwargs) -> TrainConfig:
    values = dict(shards=shards, out=out, mode="deepercluster", arch="small", image_size=SIZE, levels=(2, 5),
                  batch_size=ROWS, workers=0, num_threads=1)
    return TrainConfig.from_flat(values | kwargs)


def _planted() -> tuple[Labels, torch.Tensor]:
    counts = np.array([3, 2])  # level-2 clusters under each of the 2 level-1 clusters
    parents = np.arange(ROWS) % 2
    local = (np.arange(ROWS) // 2) % counts[parents]
    labels = Labels("planted", parents * 3 + local, parents, local, counts, 5)
    images = torch.randint(0, 256, (ROWS, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    return labels, images


def _trained(config: TrainConfig, steps: int = 3) -> dict[str, torch.Tensor]:
    """The parameters after ``steps`` steps of the trainer (its device, precision, optimizers and wrappers)."""
    from trainer.loop import Trainer
    from trainer.step import step_inputs

    labels, images = _planted()
    trainer = Trainer(config)
    trainer.labels = labels
    trainer._set_heads(labels, 0)
    trainer.network.train()
    for step in range(steps):
        stats = trainer.train_step(*step_inputs(config, labels, images, torch.arange(ROWS), 0, 0, step))
        assert np.isfinite(float(stats["loss"]))
    return {name: parameter.detach().cpu() for name, parameter in trainer.network.named_parameters()}


def test_one_cpu_process_in_fp32_is_the_plain_computation_bit_for_bit(train_shards, tmp_path, one_torch_thread):
    from trainer.network import Network
    from trainer.step import step_loss

    config = _config(train_shards, str(tmp_path / "run"), device="cpu")
    got = _trained(config)
    labels, images = _planted()
    network = Network(config)
    network.set_heads(config, labels, 0)
    optim = config.optim
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=optim.lr,
                                momentum=optim.momentum, weight_decay=optim.weight_decay)
    network.train()
    for step in range(3):
        loss, _ = step_loss(config, network, labels, images, torch.arange(ROWS), 0, 0, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = dict(network.named_parameters())
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor.detach()), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_in_fp32_follows_the_cpu_and_bf16_autocast_trains(train_shards, tmp_path):
    cpu = _trained(_config(train_shards, str(tmp_path / "cpu"), device="cpu"))
    cuda = _trained(_config(train_shards, str(tmp_path / "cuda"), device="cuda"))
    for name, tensor in cpu.items():
        torch.testing.assert_close(cuda[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    bf16 = _trained(_config(train_shards, str(tmp_path / "bf16"), device="cuda", precision="bf16"))
    moved = [name for name in cpu if not torch.equal(bf16[name], cpu[name])]
    assert moved and all(bf16[name].dtype == torch.float32 for name in bf16)  # weights stay fp32


def test_a_cuda_device_without_cuda_is_a_one_line_error(train_shards, tmp_path, monkeypatch):
    from trainer.loop import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Trainer(_config(train_shards, str(tmp_path / "run"), device="cuda"))
    with pytest.raises(ValueError, match="device="):
        _config(train_shards, str(tmp_path / "run"), device="tpu")
