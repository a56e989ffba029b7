"""The install recipes: the Dockerfile's CPU and CUDA variants (its install step run with pip stubbed, as docker
cannot run here) and the README's CPU-only install, both in step with pyproject's torch pins."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def _dockerfile() -> tuple[dict[str, str], str]:
    """The Dockerfile's ARG defaults and its install RUN step (continuation lines joined)."""
    text = _read("Dockerfile").replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ") and "VARIANT" in line]
    assert len(runs) == 1
    return args, runs[0]


def _pins() -> dict[str, str]:
    dependencies = tomllib.loads(_read("pyproject.toml"))["project"]["dependencies"]
    return {name: bound for name, bound in (re.match(r"(torch|torchvision)>=[^,]+,(<=\S+)", d).groups()
                                            for d in dependencies if re.match(r"torch(vision)?>=", d))}


def _run_install(variant: str | None) -> subprocess.CompletedProcess:
    args, script = _dockerfile()
    env = {"PATH": os.environ["PATH"], **args}
    if variant is not None:
        env["VARIANT"] = variant
    stub = 'pip() { echo "pip $*"; }\n'  # records each pip call instead of installing
    return subprocess.run(["sh", "-c", stub + script], env=env, capture_output=True, text=True)


def test_the_dockerfile_builds_a_cpu_variant_by_default_and_a_cuda_one_on_request():
    args, _ = _dockerfile()
    pins = _pins()
    assert args["VARIANT"] == "cpu"
    cpu = _run_install(None)
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.splitlines() == [f"pip install torch{pins['torch']} torchvision{pins['torchvision']} "
                                       f"--index-url {args['TORCH_INDEX']}", "pip install ."]
    cuda = _run_install("cuda")
    assert cuda.returncode == 0, cuda.stderr
    assert cuda.stdout.splitlines() == ["pip install .", "pip install --no-deps faiss-gpu-cu12",
                                        "pip uninstall -y faiss-cpu"]
    assert "faiss-gpu-cu12" in " ".join(tomllib.loads(_read("pyproject.toml"))["project"]["optional-dependencies"]
                                        ["gpu"])
    bogus = _run_install("rocm")
    assert bogus.returncode == 1 and "VARIANT must be cpu or cuda, got 'rocm'" in bogus.stderr


def test_the_readme_cpu_install_takes_the_dockerfiles_wheels():
    args, _ = _dockerfile()
    pins = _pins()
    readme = _read("README.md").replace("\\\n", " ")
    line = next(line for line in readme.splitlines() if "--index-url" in line)
    assert f'"torch{pins["torch"]}" "torchvision{pins["torchvision"]}"' in line
    assert f"--index-url {args['TORCH_INDEX']}" in line and line.rstrip().endswith("pip install -e .")
    assert "--build-arg VARIANT=cuda" in readme
