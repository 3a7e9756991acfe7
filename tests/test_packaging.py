"""Packaging: the wheel built from this tree installs into a fresh virtual environment and works there.

Offline: the wheel is built with the test venv's pinned setuptools (``--no-build-isolation``) from a copy of
the tree (nothing is written into the checkout), installed with ``--no-deps --no-index`` into a venv made
without pip, and the dependencies come from the test venv's site-packages through a ``.pth`` line (which
does not carry the editable install of sandkeep along: ``.pth`` files of an added path are not read).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from sandkeep import __version__

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sandkeep"
DATA_DIRS = ("web/templates", "web/static", "api/static", "store/migrations")


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _package_data(base: Path) -> set[str]:
    """Relative paths of every file the running package needs besides its modules' code."""
    out: set[str] = set()
    for sub in DATA_DIRS:
        for path in (base / sub).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out.add(path.relative_to(base).as_posix())
    return out


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SANDKEEP_", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_wheel_installs_into_a_fresh_venv_and_runs_from_there(tmp_path: Path) -> None:
    # 1. build the wheel from a copy of the tree
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(tree)], cwd=tmp_path)
    [wheel] = list(wheels.glob("sandkeep-*.whl"))
    assert wheel.name.startswith(f"sandkeep-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), \
        "the wheel carries the licence"
    assert not any(n.startswith("tests/") for n in names)

    # 2. a fresh venv (no pip), the wheel installed into it, dependencies borrowed from the test venv
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=tmp_path)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    (site / "zz_test_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = _clean_env()

    # 3. the installed command runs from the installed package, not from this checkout
    out = _run([str(venv / "bin" / "sandkeep"), "--version"], cwd=tmp_path, env=env)
    assert out.strip() == f"sandkeep, version {__version__}"
    probe = _run([str(python), "-c", "import json, sandkeep; print(json.dumps(sandkeep.__file__))"],
                 cwd=tmp_path, env=env)
    installed = Path(json.loads(probe)).parent
    assert installed.is_relative_to(venv), installed

    # 4. every template, static file, Swagger UI asset and migration (incl. the Alembic template) is there
    assert _package_data(PACKAGE) <= _package_data(installed), _package_data(PACKAGE) - _package_data(installed)
    assert (installed / "store" / "migrations" / "script.py.mako").is_file()

    # 5. smoke: the installed migrations build a database; the installed templates and assets render
    db = tmp_path / "smoke.db"
    out = _run([str(venv / "bin" / "sandkeep"), "db", "upgrade", "--database-url", f"sqlite:///{db}"],
               cwd=tmp_path, env=env)
    assert "upgraded from empty to" in out
    smoke = (
        "import json\n"
        "from fastapi.testclient import TestClient\n"
        "from sandkeep.api.app import create_app\n"
        "from sandkeep.clock import SystemClock\n"
        "from sandkeep.config import Settings\n"
        "from sandkeep.credentials import memory_credentials\n"
        "from sandkeep.runtime import Runtime\n"
        "clock = SystemClock()\n"
        "rt = Runtime(settings=Settings(), clock=clock, service=None, jwt_secret='x' * 40,\n"
        "             data_dir=__import__('pathlib').Path('.'), base_url='http://t',\n"
        "             credentials=memory_credentials('x' * 40, clock))\n"
        "c = TestClient(create_app(rt))\n"
        "print(json.dumps({p: c.get(p).status_code for p in ('/login', '/docs', '/docs/assets/swagger-ui.css',\n"
        "                                                     '/ui/static/htmx.min.js')}))\n"
    )
    codes = json.loads(_run([str(python), "-c", smoke], cwd=tmp_path, env=env).strip().splitlines()[-1])
    assert codes == {"/login": 200, "/docs": 200, "/docs/assets/swagger-ui.css": 200, "/ui/static/htmx.min.js": 200}
