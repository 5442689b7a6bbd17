"""benchmarks/prebuilt_wheel.py and gpu_run.sh's use of it: a wheel built on the CPU machine is
installed on the GPU machine only over the very sources it was built from."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"


def _load():
    spec = importlib.util.spec_from_file_location("prebuilt_wheel", ROOT / "benchmarks" / "prebuilt_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prebuilt = _load()
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"


def _tree(root: Path) -> Path:
    """A small stand-in of the repository's build inputs."""
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "python" / "latentspace").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'latentspace'\n")
    (root / "CMakeLists.txt").write_text("project(latentspace)\n")
    (root / "csrc" / "cuda" / "knn.cu").write_text("// kernel\n")
    (root / "python" / "latentspace" / "__init__.py").write_text("x = 1\n")
    return root


def _wheel(folder: Path, tag: str = TAG) -> Path:
    """A minimal valid wheel named latentspace (one module of its own, hashes in RECORD)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"latentspace-0.0.0-{tag}-{tag}-linux_x86_64.whl"
    info = "latentspace-0.0.0.dist-info"
    files = {
        "latentspace_prebuilt_probe.py": "PROBE = True\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: latentspace\nVersion: 0.0.0\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_the_digest_follows_every_build_input_and_nothing_else(tmp_path):
    root = _tree(tmp_path / "tree")
    first = prebuilt.source_digest(root)
    assert first == prebuilt.source_digest(root)
    # caches and build outputs that lie beside the sources on one machine and not the other
    (root / "python" / "latentspace" / "__pycache__").mkdir()
    (root / "python" / "latentspace" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / "python" / "latentspace" / "_native.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("def test(): pass\n")  # read from the tree, not the wheel
    assert prebuilt.source_digest(root) == first
    changes = [
        lambda: (root / "csrc" / "cuda" / "knn.cu").write_text("// kernel, edited\n"),
        lambda: (root / "csrc" / "cuda" / "new.cuh").write_text(""),
        lambda: (root / "python" / "latentspace" / "__init__.py").rename(root / "python" / "latentspace" / "a.py"),
        lambda: (root / "CMakeLists.txt").write_text("project(latentspace) # 2\n"),
        lambda: (root / "pyproject.toml").unlink(),
    ]
    seen = {first}
    for change in changes:
        change()
        digest = prebuilt.source_digest(root)
        assert digest not in seen
        seen.add(digest)


def test_a_moved_byte_between_a_name_and_a_content_changes_the_digest(tmp_path):
    # (lengths are hashed with each name and content: "ab" + "c" is not "a" + "bc")
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    (one / "csrc" / "ab").write_text("c")
    (two / "csrc" / "a").write_text("bc")
    assert prebuilt.source_digest(one) != prebuilt.source_digest(two)


def test_record_then_pick_gives_the_wheel(tmp_path):
    root = _tree(tmp_path / "tree")
    wheel = _wheel(tmp_path / "prebuilt")
    prebuilt.record(tmp_path / "prebuilt", prebuilt.source_digest(root), root)
    assert json.loads((tmp_path / "prebuilt" / "BUILD_INFO.json").read_text())["wheel"] == wheel.name
    assert prebuilt.pick(tmp_path / "prebuilt", root) == wheel


def test_record_refuses_sources_changed_during_the_build(tmp_path):
    root = _tree(tmp_path / "tree")
    _wheel(tmp_path / "prebuilt")
    at_start = prebuilt.source_digest(root)
    (root / "csrc" / "cuda" / "knn.cu").write_text("// edited while it built\n")
    with pytest.raises(ValueError, match="changed while the wheel was built"):
        prebuilt.record(tmp_path / "prebuilt", at_start, root)
    assert not (tmp_path / "prebuilt" / "BUILD_INFO.json").exists()


@pytest.mark.parametrize("wheels", [0, 2])
def test_record_wants_exactly_one_wheel(tmp_path, wheels):
    root = _tree(tmp_path / "tree")
    (tmp_path / "prebuilt").mkdir()
    for tag in ["cp311", "cp312"][:wheels]:
        _wheel(tmp_path / "prebuilt", tag)
    with pytest.raises(ValueError, match=f"expected one latentspace wheel in .*, found {wheels}"):
        prebuilt.record(tmp_path / "prebuilt", prebuilt.source_digest(root), root)


def test_pick_refuses_a_wheel_of_other_sources(tmp_path):
    root = _tree(tmp_path / "tree")
    _wheel(tmp_path / "prebuilt")
    prebuilt.record(tmp_path / "prebuilt", prebuilt.source_digest(root), root)
    (root / "python" / "latentspace" / "__init__.py").write_text("x = 2\n")
    with pytest.raises(ValueError, match="sources differ"):
        prebuilt.pick(tmp_path / "prebuilt", root)


def test_pick_refuses_a_wheel_of_another_python(tmp_path):
    root = _tree(tmp_path / "tree")
    _wheel(tmp_path / "prebuilt", "cp310" if TAG != "cp310" else "cp313")
    prebuilt.record(tmp_path / "prebuilt", prebuilt.source_digest(root), root)
    with pytest.raises(ValueError, match=f"this Python takes {TAG}"):
        prebuilt.pick(tmp_path / "prebuilt", root)


def test_pick_names_a_missing_or_broken_record_and_a_missing_wheel(tmp_path):
    root = _tree(tmp_path / "tree")
    folder = tmp_path / "prebuilt"
    folder.mkdir()
    with pytest.raises(ValueError, match="no BUILD_INFO.json in"):
        prebuilt.pick(folder, root)
    (folder / "BUILD_INFO.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a record of gpu_prebuild.sh"):
        prebuilt.pick(folder, root)
    (folder / "BUILD_INFO.json").write_text(json.dumps({"wheel": "latentspace-gone.whl", "digest": "0"}))
    with pytest.raises(ValueError, match="the recorded wheel latentspace-gone.whl is not in"):
        prebuilt.pick(folder, root)


def test_the_command_line_says_why_and_exits_1(tmp_path, capsys):
    assert prebuilt.main(["pick", str(tmp_path)]) == 1
    assert "prebuilt wheel: no BUILD_INFO.json in" in capsys.readouterr().err
    assert prebuilt.main(["digest"]) == 0
    assert capsys.readouterr().out.strip() == prebuilt.source_digest()


def test_the_installed_package_has_cuda_code_for_this_machine():
    # This machine's build compiles the CUDA sources (nvcc is present; CI too) and has no GPU to match.
    assert prebuilt.check_installed() == ""


def _gpu_run(tmp_path: Path, **settings: str) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GPU_RUN_", "PIP_"))}
    env = {**env, "OUT": str(tmp_path), "GPU_RUN_STAGES": "none", **settings,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, (tmp_path / "gpu_run.log").read_text()


def test_gpu_run_builds_nothing_when_asked_for_the_wheel_and_none_fits(tmp_path):
    folder = tmp_path / "prebuilt"
    folder.mkdir()
    code, log = _gpu_run(tmp_path, GPU_RUN_BUILD="wheel", GPU_RUN_PREBUILT=str(folder))
    assert code == 1, log
    assert "prebuilt wheel: no BUILD_INFO.json in" in log
    assert "BUILD FAILED: no prebuilt wheel fits" in log and "building from source" not in log
    assert log.rstrip().endswith("== done (exit 1)")


def test_gpu_run_refuses_an_unknown_build_setting(tmp_path):
    code, log = _gpu_run(tmp_path, GPU_RUN_BUILD="yes")
    assert code == 2 and "GPU_RUN_BUILD: expected 1, 0, source or wheel, got 'yes'" in log, log
    assert "building from source" not in log


def test_gpu_run_installs_a_wheel_built_from_the_tree_it_runs_on(tmp_path):
    """The whole path on this machine: a wheel recorded with this tree's digest, installed by
    pip (into a folder of the test's own, PIP_TARGET, so that the installed package stays), then
    the installed package checked for CUDA code, then the preamble."""
    folder = tmp_path / "prebuilt"
    wheel = _wheel(folder)
    (folder / "BUILD_INFO.json").write_text(json.dumps({"wheel": wheel.name, "digest": prebuilt.source_digest()}))
    target = tmp_path / "target"
    code, log = _gpu_run(tmp_path, GPU_RUN_BUILD="wheel", GPU_RUN_PREBUILT=str(folder), PIP_TARGET=str(target))
    assert code == 0, log
    assert f"installed the prebuilt wheel {wheel}" in log and "building from source" not in log
    assert (target / "latentspace_prebuilt_probe.py").is_file()
    assert log.rstrip().endswith("== done (exit 0)")
    shutil.rmtree(target)
