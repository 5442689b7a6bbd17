"""README.md's Python snippets run as written: a new user copies them first, and a snippet
that no longer runs (a renamed argument, a changed default) is a broken promise.

The ```python blocks run in order in one fresh interpreter (later blocks use what earlier ones
made: the trained VAE, the codes), in an empty folder (they write files), with matplotlib's
file backend. About 5 s on the development machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_snippets():
    assert len(_python_blocks()) >= 3  # (the extraction itself must find them)


def test_the_readme_python_snippets_run_as_written(tmp_path):
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(_python_blocks()))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
