"""A wheel of latentspace built on the CPU machine for the GPU machine, and whether it still fits.

Why: building the package takes 90-100 s of a GPU session's 15 minutes of device time
(docs/gpu-runs.md, runs 8-12), the same build each time. benchmarks/gpu_prebuild.sh builds the
wheel here instead (Python 3.12, as on the device image; sm_90, as on the H100 / H200) into
.prebuilt/ with a record of the sources it was built from; the device call carries that folder
and benchmarks/gpu_run.sh installs the wheel in seconds, but only where this module says it
fits the tree sent: the same sources byte for byte, the same Python. Anything else builds from
source, so a wheel left over from an earlier tree is never what the GPU run tests.

Commands (python3 benchmarks/prebuilt_wheel.py ...):
  digest                        the digest of this tree's build inputs
  record FOLDER --digest D      after a build: writes FOLDER/BUILD_INFO.json for the one wheel in
                                FOLDER, if the tree's digest is still D (the sources did not
                                change while it built)
  pick FOLDER                   prints the wheel to install, or why none fits (exit 1)
  check-installed               exit 0 if the installed latentspace was compiled with CUDA for
                                this machine's GPU (any, where torch sees none)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is made of: the build's configuration, the native sources and the Python
# package (which the wheel holds too). Tests, benchmarks and docs are read from the tree.
BUILD_INPUTS = ("pyproject.toml", "CMakeLists.txt", "csrc", "python")
# Build outputs and caches that may lie among the inputs here but not there (or the reverse).
SKIPPED_DIRECTORIES = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".so", ".egg-info")
RECORD = "BUILD_INFO.json"


def _input_files(root: Path) -> list[Path]:
    files = []
    for name in BUILD_INPUTS:
        top = root / name
        if top.is_file():
            files.append(top)
            continue
        for path in top.rglob("*"):
            relative = path.relative_to(root).parts
            if any(part in SKIPPED_DIRECTORIES or part.endswith(SKIPPED_SUFFIXES) for part in relative):
                continue
            if path.is_file():
                files.append(path)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the build inputs' relative paths and contents (a renamed, added or removed
    file changes it, as an edited one does)."""
    digest = hashlib.sha256()
    for path in _input_files(root):
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def python_tag() -> str:
    """The CPython tag of a wheel this interpreter installs, e.g. cp312."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def record(folder: Path, digest_at_start: str, root: Path = ROOT) -> Path:
    """Writes the record of the one wheel in `folder`; refuses when the sources changed while it
    was built (the wheel may then hold some of each)."""
    now = source_digest(root)
    if now != digest_at_start:
        raise ValueError("the sources changed while the wheel was built: build it again")
    wheels = sorted(folder.glob("latentspace-*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"expected one latentspace wheel in {folder}, found {len(wheels)}")
    path = folder / RECORD
    path.write_text(json.dumps({"wheel": wheels[0].name, "digest": now}, indent=1) + "\n")
    return path


def pick(folder: Path, root: Path = ROOT) -> Path:
    """The prebuilt wheel to install over this tree, or ValueError saying why there is none."""
    path = folder / RECORD
    if not path.is_file():
        raise ValueError(f"no {RECORD} in {folder} (benchmarks/gpu_prebuild.sh writes it)")
    try:
        info = json.loads(path.read_text())
        wheel, digest = folder / info["wheel"], info["digest"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a record of gpu_prebuild.sh: {error}") from None
    if not wheel.is_file():
        raise ValueError(f"the recorded wheel {wheel.name} is not in {folder}")
    if digest != source_digest(root):
        raise ValueError("the sources differ from those the wheel was built from")
    # name-version-pythontag-abitag-platform.whl
    tag = wheel.name[: -len(".whl")].split("-")[-3]
    if tag != python_tag():
        raise ValueError(f"the wheel is for {tag}, this Python takes {python_tag()}")
    return wheel


def check_installed() -> str:
    """'' if the installed latentspace has CUDA code for this machine's GPU, else why not."""
    import latentspace

    info = latentspace.build_info()
    if not info["cuda_compiled"]:
        return "the installed latentspace was built without CUDA"
    import torch

    if not torch.cuda.is_available():
        return ""  # (nothing to match here: the machine has no GPU)
    major, minor = torch.cuda.get_device_capability()
    if f"{major}{minor}" not in info["cuda_architectures"]:
        return f"built for {info['cuda_architectures']}, this GPU is sm_{major}{minor}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("digest")
    record_parser = commands.add_parser("record")
    record_parser.add_argument("folder", type=Path)
    record_parser.add_argument("--digest", required=True)
    commands.add_parser("pick").add_argument("folder", type=Path)
    commands.add_parser("check-installed")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "digest":
            print(source_digest())
        elif arguments.command == "record":
            print(record(arguments.folder, arguments.digest))
        elif arguments.command == "pick":
            print(pick(arguments.folder))
        else:
            reason = check_installed()
            if reason:
                raise ValueError(reason)
    except ValueError as error:
        print(f"prebuilt wheel: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
