"""The command line's shape: usage lines, --version, options derived from the configs (written once)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from dataengine import __version__
from dataengine.app import app
from dataengine.app.options import field_docs

COMMANDS = ["ingest", "embed", "synth", "demo", "cluster", "assign", "neighbors", "report", "export", "curate",
            "plan", "train", "eval"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"dataengine {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_lines_name_arguments_in_capitals(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "{" not in usage and not re.search(r"\[OPTIONS\] .*[a-z]", usage), usage


def test_positional_names_say_what_they_take():
    assert re.search(r"Usage: dataengine embed \[OPTIONS\] INGEST_OUT", invoke("embed", "--help").stdout)
    assert re.search(r"Usage: dataengine train \[OPTIONS\] INGEST_OUT", invoke("train", "--help").stdout)
    neighbors = invoke("neighbors", "--help").stdout
    assert "--num-neighbors" in neighbors and "-k" in neighbors


def _train_command():
    from dataengine.app.cli import command_named

    return command_named("train")


def test_every_training_config_field_is_one_train_option():
    """A new field of the training config is a new option, with its docstring as help, without a second
    spelling anywhere."""
    from trainer.config import SECTIONS, TrainConfig

    command = _train_command()
    names = {param.name for param in command.params}
    fields = {f.name for kind in (TrainConfig, *SECTIONS.values()) for f in dataclasses.fields(kind)
              if not dataclasses.is_dataclass(f.type) and f.name not in SECTIONS}
    assert fields <= names and names - fields == {"as_json", "dry_run", "config"}
    helps = {param.name: param.help for param in command.params}
    assert helps["buffer_size"] == field_docs(SECTIONS["data"])["buffer_size"]
    assert "``" not in helps["mode"] and "deepercluster" in helps["mode"]


def _capture(monkeypatch, run: str) -> dict:
    """Replace the stage function ``run`` by one that keeps the config it is given and stops the command."""
    seen = {}

    def fake_run(config, **_):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(run, fake_run)
    return seen


def test_train_options_build_the_sectioned_config(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "trainer.loop.run_train")
    result = invoke("train", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--pca", "16", "--levels",
                    "2,3", "--crop-scale", "0.3", "--no-balanced", "--no-sobel", "--threads", "2", "--momentum",
                    "0.5", "--storage-options", '{"anon": true}', "--mode", "deepercluster")
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.clustering.pca_dim == 16 and config.clustering.levels == (2, 3)
    assert config.data.crop_scale == (0.3, 1.0) and config.data.balanced_sampling is False
    assert config.model.sobel is False and config.distributed.num_threads == 2 and config.optim.momentum == 0.5
    assert config.data.storage_options == {"anon": True} and config.data.shards == str(tmp_path / "shards")
    # Options not given keep the config's defaults.
    assert config.schedule.epochs == 10 and config.data.image_size == 224 and config.model.arch == "small"


def test_shared_options_are_spelled_once():
    """--storage-options, --json and --overwrite come from one alias each: the same help everywhere."""
    from dataengine.app.cli import command_named

    commands = [command_named(name) for name in COMMANDS]
    for option in ("--storage-options", "--json", "--overwrite"):
        helps = {param.help for command in commands for param in command.params
                 if option in getattr(param, "opts", [])}
        assert len(helps) == 1, (option, helps)


def test_other_commands_do_not_build_the_train_options():
    """The train command's options are derived from the training config only when train runs: every other
    command starts without reading it."""
    import subprocess
    import sys

    script = ("import sys\nfrom dataengine.app import main\nsys.argv = ['dataengine', 'ingest', '--help']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\n"
              "print('trainer.config' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr


def test_every_command_is_listed_here():
    import typer.main

    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)


def _capture_cluster_config(monkeypatch):
    return _capture(monkeypatch, "dataengine.cluster.run_cluster")


def test_a_config_file_sets_options_and_the_command_line_overrides_it(monkeypatch, tmp_path):
    """--config FILE.toml: top-level keys, a table named after the command over them, flags over both; -v
    logs every option with where it came from."""
    seen = _capture_cluster_config(monkeypatch)
    config = tmp_path / "c.toml"
    config.write_text('levels = [2, 3]\npca = 8\nseed = 5\n"sample-per-centroid" = "0,64"\n'
                      '[cluster]\nclustering = "from-file"\nniter = 4\nseed = 6\n'
                      '[cluster.storage-options]\nanon = true\nsecret = "hidden"\n'
                      '[report]\nblock-rows = 7\n')
    result = invoke("-v", "cluster", "S", "--config", str(config), "--niter", "3")
    assert result.exit_code == 0, result.output
    made = seen["config"]
    assert made.name == "from-file" and made.levels == (2, 3) and made.pca_dim == 8
    assert made.sample_per_centroid == (0, 64) and made.seed == 6 and made.num_iterations == 3
    assert made.storage_options == {"anon": True, "secret": "hidden"}
    logged = " ".join(result.output.split())
    assert "niter=3," in logged and "levels='2,3' (config file)" in logged and "whiten=True (default)" in logged
    assert "hidden" not in logged and "***" in logged
    # Without the file the command's defaults hold.
    assert invoke("cluster", "S", "--clustering", "x").exit_code == 0
    assert seen["config"].levels == (4, 256) and seen["config"].seed == 0


def test_a_config_file_for_the_derived_train_options(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "trainer.loop.run_train")
    config = tmp_path / "t.toml"
    config.write_text('[train]\nout = "run"\nlevels = [3]\nmode = "deepcluster"\nepochs = 2\nbalanced = false\n')
    result = invoke("train", "shards", "--config", str(config), "--epochs", "4")
    assert result.exit_code == 0, result.output
    made = seen["config"]
    assert made.out == "run" and made.mode == "deepcluster" and made.clustering.levels == (3,)
    assert made.schedule.epochs == 4 and made.data.balanced_sampling is False


@pytest.mark.parametrize("text, message", [("bogus = 1\n", "'bogus' is not an option of cluster"),
                                           ("[cluster]\nbogus = 1\n", "'bogus' is not an option of cluster"),
                                           ("levels = [\n", "is not valid TOML"), (None, "cannot read")])
def test_a_bad_config_file_is_a_usage_error(tmp_path, text, message):
    config = tmp_path / "c.toml"
    if text is not None:
        config.write_text(text)
    result = invoke("cluster", "S", "--clustering", "x", "--config", str(config))
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output


def test_top_level_keys_of_a_shared_file_that_a_command_lacks_are_left_to_others(monkeypatch, tmp_path):
    seen = _capture_cluster_config(monkeypatch)
    config = tmp_path / "c.toml"
    config.write_text('seed = 3\nshard-size = 100\n[cluster]\nclustering = "x"\n')
    assert invoke("cluster", "S", "--config", str(config)).exit_code == 0
    assert seen["config"].seed == 3


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_a_config_file(command):
    from dataengine.app.cli import command_named

    assert "--config" in {opt for param in command_named(command).params for opt in getattr(param, "opts", [])}


def test_the_clustering_is_named_by_clustering_everywhere_and_name_still_works(monkeypatch):
    """--clustering in every command that names a clustering; --name, its old spelling, works with a warning."""
    from dataengine.app.cli import command_named

    for command in COMMANDS:
        opts = {opt for param in command_named(command).params for opt in getattr(param, "opts", [])}
        assert "--name" not in opts, command
    for command in ("cluster", "assign", "neighbors", "report", "export", "curate"):
        assert "--clustering" in {opt for p in command_named(command).params for opt in getattr(p, "opts", [])}
    seen = _capture_cluster_config(monkeypatch)
    for spelling in (["--name", "old"], ["--name=old"]):
        result = invoke("cluster", "S", *spelling)
        assert result.exit_code == 0 and seen["config"].name == "old", result.output
        assert "--name is deprecated" in " ".join(result.output.split())
    assert "deprecated" not in invoke("cluster", "S", "--clustering", "new").output
    # An argument that happens to read --name after -- is left alone.
    assert invoke("cluster", "--clustering", "x", "--", "--name").exit_code == 0
    assert seen["config"].store == "--name"


def test_workers_means_processes_decoding_images_everywhere():
    from dataengine.app.cli import command_named

    helps = {command: param.help for command in COMMANDS for param in command_named(command).params
             if "--workers" in getattr(param, "opts", [])}
    assert {"ingest", "embed", "train", "eval", "demo"} <= set(helps)
    assert all(text.startswith("Processes decoding images") for text in helps.values()), helps
