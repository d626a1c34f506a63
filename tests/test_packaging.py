"""`pip wheel .` builds a wheel whose extension honours HPCLM_CUDA, and it installs and runs in a fresh venv."""
import json
import subprocess
import sys
import venv
import zipfile

from conftest import SECOND_BUILD, hang_guard, REPO, child_env


def test_wheel_builds_installs_and_reports_what_was_asked(tmp_path):
    env = child_env(SECOND_BUILD)  # the configuration test_native's build test compiles too
    env.pop("PYTHONPATH")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], env=env, check=True, timeout=hang_guard(600),
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("hpclm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("hpclm/_C") and n.endswith(".so") for n in names), names
    assert "hpclm/dist.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hpclm = hpclm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    py = tmp_path / "venv" / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], env=env, check=True, timeout=hang_guard(300),
                   capture_output=True)
    proc = subprocess.run([tmp_path / "venv" / "bin" / "hpclm", "info", "--json"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=hang_guard(120))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["hpclm"]["path"].startswith(str(tmp_path / "venv"))
    build = report["native"]["build"]
    assert report["native"]["ok"] and build["cuda_requested"] == "0" and build["with_cuda"] is False
