"""The install path: `make install` into a staging root, `make dist` wheels that install anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_make_install_into_a_staging_root(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    paths = [
        f"DESTDIR={dest}",
        "PREFIX=/opt/eb",
        "SYSCONFDIR=/etc/eb",
        "UNITDIR=/lib/systemd/system",
        "BINDIR=/usr/bin",
        "EXTRAS=none",
    ]
    # Given a checkout, when `make install` runs
    r = make("install", *paths)
    assert r.returncode == 0, r.stdout + r.stderr
    # Then the venv, the symlink, the unit and a working config are in place
    exe = dest / "opt/eb/bin/event-bridge"
    assert exe.is_file()
    assert os.readlink(dest / "usr/bin/event-bridge") == "/opt/eb/bin/event-bridge"
    unit = (dest / "lib/systemd/system/event-bridge.service").read_text()
    assert "ExecStart=/usr/bin/event-bridge run" in unit and "/usr/local/bin" not in unit
    # the unit names the paths given, not the defaults
    assert "Environment=EVENT_BRIDGE_CONFIG=/etc/eb/bridge.toml" in unit
    assert "ConfigurationDirectory=eb\n" in unit
    assert "Documentation=file:/opt/eb/share/doc/event-bridge/README.md" in unit
    assert "/etc/event-bridge" not in unit and "/opt/event-bridge" not in unit
    # the staged venv runs from PREFIX once moved there (its scripts do not name DESTDIR)
    assert exe.read_text().splitlines()[0] == "#!/opt/eb/bin/python"
    conf = dest / "etc/eb"
    assert (conf / "functions/hello/index.py").is_file() and (conf / "conf.d").is_dir()
    assert 'state_dir = "/var/lib/event-bridge"' in (conf / "bridge.toml").read_text()
    assert (dest / "opt/eb/share/doc/event-bridge/README.md").is_file()
    # and it says what to run next
    assert "systemctl daemon-reload && systemctl enable --now event-bridge" in r.stdout
    # The installed command validates and runs the example function (state in a temp dir, as
    # the unit's StateDirectory= would give it)
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}
    python = str(dest / "opt/eb/bin/python")  # (the scripts' #! names /opt/eb: run them by it)
    v = subprocess.run(
        [python, str(exe), "validate", "-c", str(conf / "bridge.toml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert v.returncode == 0 and "config OK: 1 functions, 1 triggers" in v.stdout, v.stderr
    f = subprocess.run(
        [python, str(exe), "fire", "every-minute", "--local", "-c", str(conf / "bridge.toml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert f.returncode == 0 and '"Type": "Timer"' in f.stdout, f.stderr
    # A second install keeps the operator's config
    (conf / "bridge.toml").write_text((conf / "bridge.toml").read_text() + "\n# mine\n")
    r = make("install", *paths)
    assert r.returncode == 0, r.stderr
    assert "keeping the existing" in r.stdout
    assert (conf / "bridge.toml").read_text().endswith("# mine\n")


def test_make_dist_builds_a_wheel_that_installs_anywhere(tmp_path: Path) -> None:
    r = make("dist")
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((ROOT / "dist").glob("event_bridge-*.whl"))
    sdist = next((ROOT / "dist").glob("event_bridge-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("bridge/targets/_worker.py", "bridge/py.typed", "sources/timer.py"):
        assert must in names
    eps = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(eps).decode()
    assert "event-bridge = bridge.cli:main" in text and "timer = sources.timer:TimerSource" in text
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for must in ("systemd/event-bridge.service", "scripts/install.sh", "examples/service.toml"):
        assert must in members
    # installed outside the checkout, it imports from where it was installed
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    subprocess.run([*pip, str(target), str(wheel)], check=True, timeout=300)
    code = "import bridge.cli, sources.timer; print(bridge.cli.__file__, sources.timer.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert out.count(str(target)) == 2, out
