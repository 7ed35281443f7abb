"""bridge/sandbox.py without running anything: the isolation keys and their defaults, uids, the
bwrap command line, and finding a memory cgroup in fake cgroup file systems."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bridge import sandbox
from bridge.config import parse
from bridge.errors import ConfigError


@pytest.fixture
def code(tmp_path: Path) -> Path:
    d = tmp_path / "fn"
    d.mkdir()
    (d / "index.py").write_text("def main_handler(event, context):\n    return event\n")
    return d


def functions(code: Path, daemon: dict[str, Any] | None = None, **fn: Any) -> Any:
    raw: dict[str, Any] = {"functions": {"f": {"code": str(code), **fn}}}
    if daemon is not None:
        raw["daemon"] = daemon
    return parse(raw, env={}).functions["f"]


# --- config -------------------------------------------------------------------------------------


def test_isolation_defaults_to_process_and_fail(code: Path) -> None:
    f = functions(code)
    assert (f.isolation, f.sandbox_fallback, f.network) == ("process", "fail", True)
    assert f.tmp_size == 500 * 1024**2


def test_daemon_defaults_apply_and_a_function_overrides_them(code: Path) -> None:
    daemon = {"isolation": "sandbox", "sandbox_fallback": "process"}
    assert functions(code, daemon).isolation == "sandbox"
    assert functions(code, daemon).sandbox_fallback == "process"
    assert functions(code, daemon, isolation="process").isolation == "process"
    f = functions(code, daemon, sandbox_fallback="fail", network=False, tmp_size="64MiB")
    assert (f.sandbox_fallback, f.network, f.tmp_size) == ("fail", False, 64 * 1024**2)


def test_bad_isolation_values_are_named(code: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(
            {
                "daemon": {"isolation": "vm"},
                "functions": {"f": {"code": str(code), "tmp_size": "1KiB", "isolation": "jail"}},
            },
            env={},
        )
    locs = [loc for loc, _ in e.value.problems]
    assert "daemon.isolation" in locs
    assert "functions.f.isolation" in locs
    assert "functions.f.tmp_size" in locs


def test_web_functions_take_the_keys_only_with_bootstrap(tmp_path: Path) -> None:
    url = {"runtime": "http", "url": "http://127.0.0.1:1/"}
    with pytest.raises(ConfigError) as e:
        parse({"functions": {"w": {**url, "isolation": "sandbox", "network": False}}}, env={})
    assert e.value.problems == [
        ("functions.w", "isolation, network: only used with bootstrap = true")
    ]
    # a URL runs elsewhere: the daemon's default is no error
    parse({"daemon": {"isolation": "sandbox"}, "functions": {"w": url}}, env={})

    code = tmp_path / "web"
    code.mkdir()
    (code / "scf_bootstrap").write_text("#!/bin/sh\n")
    (code / "scf_bootstrap").chmod(0o755)
    boot = {"runtime": "http", "bootstrap": True, "code": str(code), "isolation": "sandbox"}
    with pytest.raises(ConfigError) as e:
        parse({"functions": {"w": {**boot, "network": False}}}, env={})
    assert e.value.problems == [
        (
            "functions.w",
            "network = false cannot be used with bootstrap = true: the bridge reaches the web "
            "server on 127.0.0.1",
        )
    ]
    assert parse({"functions": {"w": boot}}, env={}).functions["w"].isolation == "sandbox"


# --- uids ---------------------------------------------------------------------------------------


def test_function_uid_is_stable_in_the_dynamic_range_and_differs_by_name() -> None:
    uids = {name: sandbox.function_uid(name) for name in ("thumbnail", "resize", "a", "b")}
    assert uids == {name: sandbox.function_uid(name) for name in uids}
    assert all(sandbox.UID_FIRST <= u <= sandbox.UID_LAST for u in uids.values())
    assert len(set(uids.values())) == 4


# --- the command line ---------------------------------------------------------------------------


def box(root: bool = True, **kw: Any) -> sandbox.Sandbox:
    host = sandbox.Host(
        None,
        bwrap="/usr/bin/bwrap",
        setpriv="/usr/bin/setpriv",
        root=root,
        cgroups=sandbox.CgroupRoot(1, Path("/sys/fs/cgroup/memory/x")),
    )
    fields: dict[str, Any] = dict(
        name="fn", uid=61200, memory=64 * 1024**2, tmp_size=8 * 1024**2, network=True, host=host
    )
    fields.update(kw)
    return sandbox.Sandbox(**fields)


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


CG = sandbox.Cgroup(1, Path("/sys/fs/cgroup/memory/x/eb-1-1-fn"))


def test_command_joins_the_cgroup_then_bwrap_then_drops_to_the_uid() -> None:
    argv = box().command(["python3", "w.py"], cwd=Path("/srv/fn"), cgroup=CG)

    assert argv[:5] == ["/bin/sh", "-c", sandbox._JOIN, str(CG.procs), "/usr/bin/bwrap"]
    assert argv[5:8] == ["--ro-bind", "/", "/"]
    assert argv[argv.index("--tmpfs") - 4 : argv.index("--tmpfs") + 2] == [
        "--perms", "1777", "--size", str(8 * 1024**2), "--tmpfs", "/tmp",
    ]  # fmt: skip
    assert "--unshare-net" not in argv
    assert {"--unshare-pid", "--unshare-ipc", "--die-with-parent"} <= set(argv)
    assert pairs(argv, "--chdir") == ["/srv/fn"]
    rest = argv[argv.index("--") + 1 :]
    assert rest[:4] == ["/usr/bin/setpriv", "--reuid=61200", "--regid=61200", "--clear-groups"]
    assert "--no-new-privs" in rest
    assert rest[-3:] == ["--", "python3", "w.py"]


def test_command_without_root_uses_a_user_namespace_and_network_false_a_net_namespace() -> None:
    argv = box(root=False, network=False).command(["x"], cwd=Path("/srv"), cgroup=CG)
    assert "--unshare-user" in argv and "--unshare-net" in argv
    assert "/usr/bin/setpriv" not in argv


def test_command_hides_folders_and_exposes_what_lies_under_them() -> None:
    b = box(hide=(Path("/var/lib/eb"),), binds=((Path("/srv/layer"), Path("/opt/layer1")),))
    argv = b.command(
        ["x"],
        cwd=Path("/var/lib/eb/code/fn"),
        cgroup=CG,
        expose=[Path("/usr/lib/python3"), Path("/tmp/venv")],
    )
    assert pairs(argv, "--tmpfs") == ["/tmp", "/var/lib/eb", "/opt"]
    assert pairs(argv, "--dir") == ["/var/lib/eb/code"]  # made 0755 on its way to the code
    assert pairs(argv, "--ro-bind") == ["/", "/tmp/venv", "/var/lib/eb/code/fn", "/srv/layer"]
    assert "/opt/layer1" in argv
    assert pairs(argv, "--remount-ro") == ["/var/lib/eb", "/opt"]
    # only after the binds does the hidden folder become read-only
    assert argv.index("/srv/layer") < argv.index("--remount-ro")


def test_private_files_are_masked_where_the_function_could_see_them() -> None:
    b = box(
        hide_files=(
            Path("/tmp/project/bridge.toml"),  # in the exposed code folder
            Path("/tmp/other/token"),  # under /tmp: not there at all
            Path("/etc/event-bridge/bridge.toml"),
        )
    )
    argv = b.command(["x"], cwd=Path("/tmp/project"), cgroup=CG)
    masked = [
        argv[i + 2] for i, a in enumerate(argv) if a == "--dev-bind" and argv[i + 1] == "/dev/null"
    ]
    assert masked == ["/tmp/project/bridge.toml", "/etc/event-bridge/bridge.toml"]
    assert argv.index("/tmp/project") < argv.index("/tmp/project/bridge.toml")


def test_for_function_hides_the_state_dir_and_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = Path("/var/tmp") / f"eb-unit-{os.getpid()}"
    state.mkdir(exist_ok=True)
    try:
        creds = state / "creds"  # inside the state dir: hidden with it
        creds.mkdir(exist_ok=True)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
        b = sandbox.for_function(
            "fn",
            memory=1,
            tmp_size=1,
            network=True,
            host=box().host,
            state_dir=state,
            binds=[(tmp_path, Path("/opt/l"))],
        )
        assert b.hide == (state,)
        assert b.uid == sandbox.function_uid("fn")
        assert b.binds == ((tmp_path, Path("/opt/l")),)
    finally:
        (state / "creds").rmdir()
        state.rmdir()


# --- cgroups ------------------------------------------------------------------------------------

V1_CGROUP = """12:memory:/process_api/abc
11:pids:/
0::/
"""
V2_CGROUP = "0::/system.slice/event-bridge.service\n"


def mountinfo(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "mountinfo"
    p.write_text("".join(f"{i} 1 0:{i} / {line}\n" for i, line in enumerate(lines, 30)))
    return str(p)


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_finds_the_v1_memory_hierarchy(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    info = mountinfo(
        tmp_path,
        [
            f"{fs}/unified rw - cgroup2 cgroup2 rw",
            f"{fs}/memory rw,relatime - cgroup cgroup rw,memory",
        ],
    )
    write(fs / "unified" / "cgroup.controllers", "hugetlb\n")
    cg = write(tmp_path / "cgroup", V1_CGROUP)

    write(fs / "memory" / "process_api" / "cgroup.procs", "")
    found = sandbox.find_cgroup_root(str(cg), info)

    assert found == sandbox.CgroupRoot(1, fs / "memory" / "process_api" / "abc")
    assert sandbox.prepare_cgroup_root(found) == found


def test_v1_at_the_hierarchy_root_uses_a_folder_of_its_own(tmp_path: Path) -> None:
    top = tmp_path / "memory"
    write(top / "cgroup.procs", "1\n")

    got = sandbox.prepare_cgroup_root(sandbox.CgroupRoot(1, top))

    assert got == sandbox.CgroupRoot(1, top / "event-bridge")
    assert got.path.is_dir()


def test_v2_delegated_cgroup_moves_the_daemon_into_a_leaf(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    info = mountinfo(tmp_path, [f"{fs} rw - cgroup2 cgroup2 rw,nsdelegate"])
    unit = fs / "system.slice" / "event-bridge.service"
    write(unit / "cgroup.controllers", "cpu memory pids\n")
    write(unit / "cgroup.subtree_control", "")
    write(unit / "cgroup.procs", f"{os.getpid()}\n")
    write(unit / "daemon" / "cgroup.procs", "")  # the kernel makes it with the folder
    cg = write(tmp_path / "cgroup", V2_CGROUP)

    found = sandbox.find_cgroup_root(str(cg), info)
    prepared = sandbox.prepare_cgroup_root(found)

    assert found == prepared == sandbox.CgroupRoot(2, unit)
    assert (unit / "daemon" / "cgroup.procs").read_text() == str(os.getpid())
    assert (unit / "cgroup.subtree_control").read_text() == "+memory"


def test_v2_shared_cgroup_without_root_says_to_delegate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = tmp_path / "fs" / "user.slice"
    write(unit / "cgroup.controllers", "memory\n")
    write(unit / "cgroup.subtree_control", "")
    write(unit / "cgroup.procs", "1\n")  # init is not ours
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    with pytest.raises(OSError, match="Delegate=yes") as e:
        sandbox.prepare_cgroup_root(sandbox.CgroupRoot(2, unit))
    assert "also holds other processes (pid 1)" in str(e.value)


def test_v2_shared_cgroup_as_root_uses_its_own_cgroup_at_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    top = tmp_path / "fs"
    write(top / "cgroup.controllers", "memory\n")
    write(top / "cgroup.subtree_control", "memory\n")
    unit = top / "user.slice"
    write(unit / "cgroup.controllers", "memory\n")
    write(unit / "cgroup.subtree_control", "")
    write(unit / "cgroup.procs", "1\n")
    (top / "event-bridge").mkdir()
    write(top / "event-bridge" / "cgroup.subtree_control", "")

    got = sandbox.prepare_cgroup_root(sandbox.CgroupRoot(2, unit), mount=top)

    assert got == sandbox.CgroupRoot(2, top / "event-bridge")
    assert (top / "event-bridge" / "cgroup.subtree_control").read_text() == "+memory"


@pytest.mark.parametrize(
    ("version", "file", "text", "killed"),
    [
        (1, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n", True),
        (1, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n", False),
        (2, "memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", True),
        (2, "memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", False),
    ],
)
def test_oom_killed(tmp_path: Path, version: int, file: str, text: str, killed: bool) -> None:
    write(tmp_path / file, text)
    assert sandbox.Cgroup(version, tmp_path).oom_killed() is killed


def test_build_targets_gives_functions_the_config_and_secret_files(tmp_path: Path) -> None:
    from bridge.wiring import build_targets

    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "index.py").write_text("def main_handler(event, context):\n    return 1\n")
    for name in ("token", "password", "options"):
        (tmp_path / name).write_text("s3cr3t-s3cr3t-s3cr3t")
    raw = {
        "api": {"tokens": [{"name": "ci", "secret_file": "token"}]},
        "functions": {"f": {"code": "fn"}},
        "triggers": {
            "q": {
                "type": "amqp",
                "function": "f",
                "url": "amqp://guest@127.0.0.1/",
                "queue": "jobs",
                "password_file": "password",
            },
        },
    }
    config = parse(raw, env={}, base_dir=tmp_path, files=(tmp_path / "bridge.toml",))

    private = build_targets(config)["f"].ctx.private_files

    assert private == (tmp_path / "bridge.toml", tmp_path / "token", tmp_path / "password")
