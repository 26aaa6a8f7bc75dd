"""Packaging (DESIGN.md "Packaging"): ``kernels/`` at the repository root is ``rlcs_fast.kernels``.

How, and why a top-level ``kernels`` steps aside: the docstring of ``rlcs_fast/__init__.py``. Each case
runs in a fresh interpreter so that ``sys.path`` is exactly what a user gets: editable and regular
installs, run from the repository root and from elsewhere, with and without a distribution named
``kernels`` installed. The probe imports transformers' Qwen2.5-VL class (what the shadowing used to
break), the trainer's modules, and runs ``rlcs_fast.kernels.fused_linear_logprob`` against a float64
log-softmax so that "importable" means "the real kernels module, working".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters, virtual environments and pip installs

REPO = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils.import_utils import _is_package_available, is_kernels_available
    import rlcs_fast, rlcs_fast.grpo, rlcs_fast.kernels, rlcs_fast.sft
    from rlcs_fast.kernels import fused_linear_logprob

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (6,), generator=g)
    got = fused_linear_logprob(hidden, weight, targets, impl="torch").double()
    want = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    available = is_kernels_available()
    try:
        import kernels as top
    except ImportError:
        top = None
    print("PROBE" + json.dumps({
        "model_class": Qwen2_5_VLForConditionalGeneration.__name__,
        "rlcs_fast": rlcs_fast.__file__,
        "rlcs_kernels": rlcs_fast.kernels.__file__,
        "logprob_err": float((got - want).abs().max()),
        "available": available,
        "probed_version": _is_package_available("kernels", return_version=True)[1],
        "top_file": getattr(top, "__file__", None),
        "top_marker": getattr(top, "MARKER", None),
        "top_has_ours": hasattr(top, "fused_linear_logprob"),
    }))
    """
)



def _sources(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree filter: skip what is not source. At the top level that is every hidden entry
    (virtual environments, .git, caches) and run/build outputs; pip builds inside its source folder."""
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(directory).resolve() == REPO:
        skip |= {n for n in names if n.startswith(".") or n in ("runs", "build", "dist")}
    return skip


def _env(pythonpath: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(key, None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _probe(python: str | Path, cwd: Path, pythonpath: Path | None = None) -> dict:
    proc = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=_env(pythonpath), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"probe failed in {cwd} (PYTHONPATH={pythonpath}):\n{proc.stderr[-4000:]}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def _assert_working(out: dict) -> None:
    assert out["model_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert out["logprob_err"] < 1e-5, out
    # our kernels never surface as the top-level package `kernels`
    assert not out["top_has_ours"], out


def _is_under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _pip_install(src: Path, target: Path) -> None:
    pytest.importorskip("setuptools", reason="--no-build-isolation builds need setuptools in this venv")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "--target", str(target), str(src)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _editable_install_of(root: Path) -> bool:
    """An installed rlcs-fast is an editable install of ``root`` (its PEP 610 ``direct_url.json``); a
    regular install with the checkout on PYTHONPATH imports from the checkout too, but is not one."""
    for dist in importlib.metadata.distributions(name="rlcs-fast"):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        url = urllib.parse.urlparse(info.get("url", ""))
        if info.get("dir_info", {}).get("editable") and url.scheme == "file":
            if Path(urllib.request.url2pathname(url.path)).resolve() == root.resolve():
                return True
    return False


@pytest.fixture(scope="module")
def editable() -> None:
    spec = importlib.util.find_spec("rlcs_fast")
    if spec is None or not _is_under(spec.origin, REPO) or not _editable_install_of(REPO):
        pytest.skip("rlcs_fast here is not an editable install of this checkout")


@pytest.fixture(scope="module")
def editable_root_probe(editable) -> dict:
    return _probe(sys.executable, REPO)


@pytest.fixture(scope="module")
def regular(tmp_path_factory) -> tuple[Path, Path]:
    """(python, target): ``pip install --target`` of a copy of the checkout, and an interpreter that sees
    this venv's dependencies but not its editable install.

    The copy keeps pip's in-tree build (``build/``, ``*.egg-info``) out of the checkout others are using.
    The interpreter is a fresh venv whose ``.pth`` lists this venv's site-packages as a plain path: the
    dependencies import, but the ``.pth`` files in there (setuptools' editable finder, which maps
    ``rlcs_fast.kernels`` to the checkout and would hide a broken regular install) are not run."""
    root = tmp_path_factory.mktemp("regular")
    src, target = root / "src", root / "site"
    shutil.copytree(REPO, src, ignore=_sources)
    _pip_install(src, target)
    venv = root / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, target


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """A folder holding a stand-in distribution named ``kernels`` 0.10.0 (with a ``dist-info``), as a
    user with the Hugging Face ``kernels`` package installed would have."""
    root = tmp_path_factory.mktemp("standin")
    src, target = root / "src", root / "site"
    (src / "kernels").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(
        """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "kernels"
        version = "0.10.0"

        [tool.setuptools]
        packages = ["kernels"]
        """))
    (src / "kernels" / "__init__.py").write_text('__version__ = "0.10.0"\nMARKER = "stand-in"\n')
    _pip_install(src, target)
    return target


# --- editable install (the dev venv) -------------------------------------------------------------------

def test_editable_from_repo_root(editable_root_probe):
    out = editable_root_probe
    _assert_working(out)
    assert Path(out["rlcs_fast"]).resolve() == REPO / "rlcs_fast" / "__init__.py"
    assert Path(out["rlcs_kernels"]).resolve() == REPO / "kernels" / "__init__.py"


def test_editable_entry_point_from_repo_root(editable, tmp_path):
    # the entry point's imports (transformers' model classes included) run with the root on sys.path; a
    # config error is the cheapest way to stop it right after them, before any work
    cmd = [sys.executable, "-m", "rlcs_fast.train", "--cfg", "configs/tiny.toml", "--run.dir",
           str(tmp_path / "run"), "--optim.lrr", "1e-5"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "`optim.lrr`" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-4000:]


def test_editable_from_other_dir(editable, tmp_path):
    out = _probe(sys.executable, tmp_path)
    _assert_working(out)
    assert Path(out["rlcs_kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    assert out["top_file"] is None, "no top-level `kernels` exists outside the checkout"


def test_no_kernels_distribution_transformers_sees_none(editable_root_probe):
    try:
        importlib.metadata.version("kernels")
        pytest.skip("a distribution named `kernels` is installed in this venv")
    except importlib.metadata.PackageNotFoundError:
        pass
    # from the root transformers finds our folder, imports it as `kernels`, and must see nothing usable
    assert editable_root_probe["available"] is False
    assert editable_root_probe["top_file"] is None or not editable_root_probe["top_has_ours"]


# --- regular install (pip install --target) ------------------------------------------------------------

def test_regular_install_layout(regular):
    _, target = regular
    installed = sorted(p.name for p in target.iterdir())
    assert "kernels" not in installed, f"a top-level `kernels` package was installed: {installed}"
    assert (target / "rlcs_fast" / "kernels" / "__init__.py").is_file()
    assert not [n for n in installed if n.endswith(".dist-info") and not n.startswith("rlcs_fast")], installed
    # every subpackage of the source tree ships (pyproject lists them one by one)
    source = {p.parent.relative_to(REPO / "rlcs_fast") for p in (REPO / "rlcs_fast").rglob("__init__.py")}
    missing = [str(d) for d in source if not (target / "rlcs_fast" / d / "__init__.py").is_file()]
    assert not missing, f"subpackages missing from a regular install (pyproject `packages`): {missing}"


def test_regular_install_from_other_dir(regular, tmp_path):
    python, target = regular
    out = _probe(python, tmp_path, pythonpath=target)
    _assert_working(out)
    assert Path(out["rlcs_fast"]).resolve() == (target / "rlcs_fast" / "__init__.py").resolve()
    assert Path(out["rlcs_kernels"]).resolve() == (target / "rlcs_fast" / "kernels" / "__init__.py").resolve()
    assert out["top_file"] is None and out["available"] is False


def test_regular_install_from_repo_root(regular):
    # The root comes first on sys.path, so Python imports the checkout's rlcs_fast/, not the installed
    # copy; its kernels must still be found (the checkout's kernels/, as no editable finder maps them).
    python, target = regular
    out = _probe(python, REPO, pythonpath=target)
    _assert_working(out)
    pkg = Path(out["rlcs_fast"]).resolve().parent
    kernels_dir = Path(out["rlcs_kernels"]).resolve().parent
    if pkg == (target / "rlcs_fast").resolve():
        assert kernels_dir == pkg / "kernels", out
    else:
        assert pkg == REPO / "rlcs_fast" and kernels_dir == REPO / "kernels", out
    assert out["available"] is False


# --- a distribution named `kernels` installed ------------------------------------------------------------

def test_kernels_distribution_is_not_shadowed_from_repo_root(editable, standin):
    out = _probe(sys.executable, REPO, pythonpath=standin)
    _assert_working(out)
    assert out["top_marker"] == "stand-in", out
    assert _is_under(out["top_file"], standin), out
    # transformers read the distribution's metadata (0.10.0 is outside its supported range: not available)
    assert out["probed_version"] == "0.10.0" and out["available"] is False, out
    assert Path(out["rlcs_kernels"]).resolve() == REPO / "kernels" / "__init__.py"
