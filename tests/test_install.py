"""Tests of the installation: the torchvision fix, and that environment.yml, pyproject.toml, constraints.txt and
the install commands agree. A few fresh interpreters, ~10 s."""
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import unitok

ROOT = Path(__file__).resolve().parents[1]
NMS_ERROR = "operator torchvision::nms does not exist"


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the same Python), from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# Whether torchvision's compiled ops load next to this torch, probed in a fresh interpreter the way torchvision
# itself (and unitok.torchvision_fix) does it: load its _C library.
PROBE = """
    import glob, importlib.util, os, torch
    spec = importlib.util.find_spec("torchvision")
    folder = spec.submodule_search_locations[0]
    try:
        for lib in glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd")):
            torch.ops.load_library(lib)
        print("OPS_LOAD")
    except (OSError, RuntimeError) as error:
        print("OPS_BROKEN", type(error).__name__, str(error).splitlines()[0][:200])
"""


@pytest.fixture(scope="module")
def ops_load() -> bool:
    probe = run_python(PROBE)
    assert probe.returncode == 0, probe.stderr
    return "OPS_LOAD" in probe.stdout


# ---------------------------------------------------------------------------------------------------------------
# The torchvision fix


def test_imports_work_in_a_fresh_interpreter_after_unitok():
    result = run_python("""
        import unitok, torchvision, timm, open_clip
        import torch
        from torchvision import transforms
        from PIL import Image
        image = Image.new("RGB", (40, 30), (200, 10, 10))
        x = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()])(image)
        assert x.shape == (3, 16, 16)
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
        ids = open_clip.get_tokenizer("ViT-B-32")(["a red circle"])
        assert ids.shape == (1, 77)
        print("OK", torchvision.__version__, timm.__version__, open_clip.__version__)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK ")


def test_without_unitok_torchvision_fails_where_its_ops_cannot_load(ops_load):
    """The control experiment: the same import without unitok first. Where torchvision's compiled ops cannot load
    (PyPI's CUDA torchvision wheel next to a CPU torch, as on these machines) it dies with the known error, so
    the fix is what makes the test above pass. Where they load, there is nothing to show."""
    if ops_load:
        pytest.skip("torchvision's compiled ops load here, so torchvision imports fine without the fix")
    result = run_python("import torchvision")
    assert result.returncode != 0, "import torchvision unexpectedly worked without unitok"
    assert NMS_ERROR in result.stderr, result.stderr[-3000:]


def test_apply_returns_false_when_torchvision_was_already_imported(ops_load):
    assert "torchvision" in sys.modules                        # unitok imports timm, which imports torchvision
    assert unitok.torchvision_fix.apply() is False
    # Each branch in isolation: fresh copies of the module, loaded from its file without unitok's __init__.
    path = Path(unitok.torchvision_fix.__file__)
    result = run_python(f"""
        import importlib.util, sys

        def fresh_copy(name):
            spec = importlib.util.spec_from_file_location(name, {str(path)!r})
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        first = fresh_copy("fix_a")
        assert "torchvision" not in sys.modules
        print("FIRST", first.apply())            # True only if the schemas had to be declared
        print("AGAIN", first.apply())            # already applied
        import torchvision                         # now works either way
        print("LATE", fresh_copy("fix_b").apply())  # torchvision already imported: nothing to do
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split() for line in result.stdout.splitlines())
    assert lines == {"FIRST": str(not ops_load), "AGAIN": "False", "LATE": "False"}


# ---------------------------------------------------------------------------------------------------------------
# environment.yml == pyproject.toml (+ constraints.txt pins)


def normalize(name: str) -> str:
    """PEP 503 name normalisation: case-insensitive, runs of -, _ and . are equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_of(requirements) -> dict:
    """{normalised name: specifier string ('' when unpinned)} for requirement strings, refusing duplicates."""
    pins = {}
    for line in requirements:
        req = Requirement(line)
        name = normalize(req.name)
        assert name not in pins, f"{req.name} is listed twice"
        pins[name] = str(req.specifier)
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def project_requirements(pyproject) -> dict:
    project = pyproject["project"]
    union = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        union += extra
    return pins_of(union)


@pytest.fixture(scope="module")
def constraints() -> dict:
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return pins_of(line for line in lines if line)


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def environment_pip(environment) -> list:
    sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return [str(item).strip() for item in sections[0]]


def test_environment_yml_shape(environment):
    assert environment["name"] == "unitok"
    assert environment["channels"] == ["conda-forge"]
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    pip = environment_pip(environment)
    assert pip[-1] == "-e ."                                  # the project itself, last
    options = [line for line in pip if line.startswith("-")]
    assert options == ["-e ."], f"pip options are not allowed in environment files (only '-e .'): {options}"


def test_environment_lists_exactly_the_projects_packages(environment, project_requirements):
    listed = pins_of(line for line in environment_pip(environment) if not line.startswith("-"))
    assert set(listed) == set(project_requirements), (
        f"only in environment.yml: {sorted(set(listed) - set(project_requirements))}; "
        f"only in pyproject.toml: {sorted(set(project_requirements) - set(listed))}")


def test_environment_pins_are_the_constraints(environment, project_requirements, constraints):
    listed = pins_of(line for line in environment_pip(environment) if not line.startswith("-"))
    for name, spec in listed.items():
        expected = constraints.get(name) or project_requirements[name]
        assert spec == expected, f"environment.yml pins {name}{spec or ' (unpinned)'}, expected {name}{expected}"
    assert listed["torch"] == constraints["torch"] == "==2.13.0"
    assert listed["torchvision"] == constraints["torchvision"] == "==0.28.0"


def test_constraints_and_pyproject_agree(constraints, project_requirements):
    assert constraints["torch"] == "==2.13.0" and constraints["torchvision"] == "==0.28.0"
    assert all(spec.startswith("==") for spec in constraints.values()), constraints
    assert set(constraints) <= set(project_requirements), sorted(set(constraints) - set(project_requirements))
    for name, spec in project_requirements.items():               # a pin in pyproject must match the constraint
        if spec and name in constraints:
            assert spec == constraints[name], f"pyproject says {name}{spec}, constraints.txt {name}{constraints[name]}"


def pip_install_commands(path: Path) -> list:
    """Every `pip install ...` command in a Makefile / shell script, as (command text, install targets)."""
    text = path.read_text().replace("\\\n", " ")                 # join line continuations
    commands = []
    for match in re.finditer(r"\bpip3?\s+install\b([^;&|#\n]*)", text):
        words, targets = shlex.split(match.group(1)), []
        skip_value = False
        for word in words:
            if skip_value:
                skip_value = False
            elif word in ("-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url"):
                skip_value = True
            elif word in ("-e", "--editable"):
                continue                                        # its value is a target
            elif not word.startswith("-"):
                targets.append(word)
        commands.append((match.group(0).strip(), targets))
    return commands


def test_every_install_command_uses_the_constraints():
    commands = []
    for path in (ROOT / "Makefile", ROOT / ".ci" / "run"):
        if path.exists():
            commands += [(path.name, *c) for c in pip_install_commands(path)]
    project_installs = 0
    for source, command, targets in commands:
        if targets == ["pip"]:                                  # upgrading pip itself: nothing to constrain
            continue
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", command), (
            f"{source}: `{command}` does not use -c constraints.txt")
        project_installs += any(t.startswith(".") for t in targets)
    assert project_installs >= 1, f"no install of the project (pip install ... -e .) found: {commands}"


def _make_variable(name: str) -> list:
    match = re.search(rf"^{name}\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"the Makefile has no {name} variable"
    return match.group(1).split(",")


def test_makefile_installs_every_extra(pyproject):
    assert set(_make_variable("EXTRAS")) == set(pyproject["project"]["optional-dependencies"])


def _recipe(target_line: str) -> list:
    """The recipe lines (tab-indented) that follow the first Makefile line starting with `target_line`."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(target_line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_lab_installs_only_the_notebooks_extra_and_shows_progress(pyproject):
    lab_extras = _make_variable("LAB_EXTRAS")
    assert set(lab_extras) <= set(pyproject["project"]["optional-dependencies"])
    assert not {"test", "bench"} & set(lab_extras), lab_extras       # no pytest, playwright, benchmark packages
    assert re.search(r"^lab:\s*\$\(LAB_STAMP\)", (ROOT / "Makefile").read_text(), re.M), "lab must use the lab set-up"
    recipe = _recipe("$(LAB_STAMP):")
    installs = [i for i, line in enumerate(recipe) if "pip install" in line and "-e" in line]
    assert len(installs) == 1 and "$(LAB_EXTRAS)" in recipe[installs[0]], recipe
    assert "--quiet" not in recipe[installs[0]] and "-q " not in recipe[installs[0]], "pip must show its progress"
    assert any("echo" in line for line in recipe[:installs[0]]), "say what is being installed before pip starts"
