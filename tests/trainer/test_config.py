"""The training configuration by sections: validation per section and per mode, the flat reader, the stored form."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainer.config import (SECTIONS, ClusteringConfig, DataConfig, DistributedConfig, ModelConfig, OptimConfig,
                            ScheduleConfig, TrainConfig)


def _sectioned(**data) -> TrainConfig:
    return TrainConfig(out="run", mode="deepcluster", seed=3, data=DataConfig(shards="in", **data),
                       model=ModelConfig(arch="resnet18", sobel=False),
                       optim=OptimConfig(lr=0.1), clustering=ClusteringConfig(levels=(8,)),
                       schedule=ScheduleConfig(epochs=4), distributed=DistributedConfig(num_threads=2))


def test_every_section_is_frozen_keyword_only_and_documented():
    import ast
    import inspect

    import trainer.config as module

    tree = ast.parse(inspect.getsource(module))
    for kind in (*SECTIONS.values(), TrainConfig):
        params = kind.__dataclass_params__
        assert params.frozen and kind.__dataclass_fields__ and all(f.kw_only for f in dataclasses.fields(kind))
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == kind.__name__)
        documented = {prev.target.id for prev, doc in zip(node.body, node.body[1:])
                      if isinstance(prev, ast.AnnAssign) and isinstance(doc, ast.Expr)
                      and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}
        assert documented == {f.name for f in dataclasses.fields(kind)}, kind.__name__


def test_field_names_are_unique_over_the_sections():
    names = [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)]
    names += [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("make, match", [
    (lambda: DataConfig(shards="x", batch_size=0), "batch_size=0"),
    (lambda: DataConfig(shards="x", workers=-1), "workers=-1"),
    (lambda: DataConfig(shards="x", crop_scale=(0.5, 0.2)), "crop_scale"),
    (lambda: DataConfig(shards="x", samples_per_epoch=0), "samples_per_epoch=0"),
    (lambda: ModelConfig(arch="vgg11"), "arch='vgg11'"),
    (lambda: ModelConfig(dropout=1.0), "dropout=1.0"),
    (lambda: OptimConfig(lr=0), "lr=0"),
    (lambda: OptimConfig(momentum=1.0), "momentum=1.0"),
    (lambda: OptimConfig(weight_decay=-1), "weight_decay=-1"),
    (lambda: ClusteringConfig(levels=()), "levels"),
    (lambda: ClusteringConfig(levels=(4, 0)), "levels"),
    (lambda: ClusteringConfig(pca_dim=-1), "pca_dim=-1"),
    (lambda: ClusteringConfig(nmi_average="harmonic"), "nmi_average"),
    (lambda: ClusteringConfig(sample_per_centroid=(-1,)), "sample_per_centroid"),
    (lambda: DataConfig(shards="x", shards_in_flight=0), "shards_in_flight"),
    (lambda: ScheduleConfig(epochs=0), "epochs=0"),
    (lambda: ScheduleConfig(budget_clock="gpu"), "budget_clock"),
    (lambda: ScheduleConfig(time_budget=0), "time_budget=0"),
    (lambda: DistributedConfig(num_threads=0), "num_threads=0"),
    (lambda: TrainConfig(out="r", data=DataConfig(shards="x"), mode="simclr"), "mode='simclr'"),
    (lambda: TrainConfig(out="r", data=DataConfig(shards="x"), clustering=ClusteringConfig(levels=(4,))),
     "two levels"),
    (lambda: TrainConfig(out="r", data=DataConfig(shards="x"), mode="deepcluster"), "one level"),
    (lambda: TrainConfig(out="r", data=DataConfig(shards="x"), mode="clusterfit",
                         clustering=ClusteringConfig(levels=(4,))), "features-from"),
])
def test_each_section_names_its_bad_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_section_of_the_wrong_kind_is_refused():
    with pytest.raises(TypeError, match="model must be a ModelConfig"):
        TrainConfig(out="r", data=DataConfig(shards="x"), model=OptimConfig())


def test_flat_options_land_in_their_sections():
    config = TrainConfig.from_flat({"out": "run", "mode": "deepcluster", "seed": 3, "shards": "in",
                                    "arch": "resnet18", "sobel": False, "lr": 0.1, "levels": [8], "epochs": 4,
                                    "num_threads": 2})
    assert config == _sectioned()
    assert config.clustering.levels == (8,)
    with pytest.raises(ValueError, match="unknown training option.*learning_rate"):
        TrainConfig.from_flat({"out": "run", "shards": "in", "learning_rate": 0.1})


def test_the_stored_form_is_by_section_and_leaves_out_storage_options():
    stored = _sectioned(storage_options={"secret": "s3cr3t"}).to_dict()
    assert set(stored) == {"out", "mode", "seed", *SECTIONS}
    assert stored["data"]["shards"] == "in" and "storage_options" not in stored["data"]
    assert "s3cr3t" not in json.dumps(stored)


@pytest.mark.parametrize("mode", ["deepercluster", "deepcluster", "rotnet", "clusterfit"])
def test_mode_defaults_are_faithful_to_each_method(mode):
    """ClusterFit defines no Sobel input, whitening or cluster-balanced sampling (DeepCluster's additions): off by
    default for that mode only; explicit values win; the crops' smallest scale is the reference's 0.08."""
    levels = (4, 8) if mode == "deepercluster" else (8,)
    config = TrainConfig.from_flat({"shards": "in", "out": "run", "mode": mode, "levels": levels,
                                    "features_from": "pre.pt"})
    deepcluster_additions = mode != "clusterfit"
    assert config.model.sobel is deepcluster_additions
    assert config.data.balanced_sampling is deepcluster_additions
    assert config.clustering.whiten is deepcluster_additions
    assert config.clustering.pca_dim == (64 if deepcluster_additions else 0)
    assert config.data.crop_scale == (0.08, 1.0) and config.model.dropout == 0.0
    explicit = TrainConfig.from_flat({"shards": "in", "out": "run", "mode": mode, "levels": levels,
                                      "features_from": "pre.pt", "sobel": True, "balanced_sampling": True,
                                      "whiten": True, "pca_dim": 32})
    assert (explicit.model.sobel, explicit.data.balanced_sampling, explicit.clustering.whiten,
            explicit.clustering.pca_dim) == (True, True, True, 32)
    assert json.loads(json.dumps(config.to_dict()))["model"]["sobel"] is deepcluster_additions  # stored resolved
