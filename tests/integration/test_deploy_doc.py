"""docs/deploy.md, run as written: the operator's real path from keys to a staged rollout on
Mosquitto with TLS, adding a device and removing one.

The commands come from the page's code blocks, in order; each runs on the host its
`<!-- run: HOST -->` comment names. Hosts are network namespaces of one lab segment, where
`broker.plant7.example` resolves (through /etc/netns/NAME/hosts, which `ip netns exec` mounts)
to the operator host. What a person does by hand and a test cannot do literally is done here and
nowhere else: `systemctl` starts a unit's ExecStart as a process (and reload sends its signal),
the copies between machines follow the page's `<!-- copy: ... -->` comments, and each host's
/etc/edgeswarm, /var/lib/..., /opt/edgeswarm and /media/keys are directories of its own (PATHS),
with a device's install target under its directory as its sysroot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.demo.sample_images import build_image
from tests.support import netlab
from tests.support.deadlines import scaled
from tests.support.harness import mosquitto_available

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deploy.md"
BROKER_NAME = "broker.plant7.example"
PASSPHRASE = "correct horse battery staple"
# Absolute paths on the page, each a directory of its host's own (longest first: one may prefix another).
PATHS = ("/var/lib/edgeswarm-operator", "/var/lib/edgeswarm", "/etc/edgeswarm", "/opt/edgeswarm", "/media/keys",
         "/etc/systemd/system")
HANDLED = ("cp config/systemd/", "useradd ", "systemctl ")  # what a test does in its own way (module docstring)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netlab.available() is not None, reason=f"network namespaces: {netlab.available()}"),
    pytest.mark.skipif(not mosquitto_available(), reason="Mosquitto is not installed (apt-get install mosquitto)"),
]


# -- the page ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    host: str
    language: str
    text: str


@dataclass(frozen=True)
class Copy:
    source: tuple[str, str]
    target: tuple[str, str]
    exclude: str | None


@dataclass(frozen=True)
class Expect:
    what: str


def steps(page: str) -> list[Run | Copy | Expect]:
    """The page's steps in order. Every code block must say where it runs (or that it is set-up the
    test machine already has): a block nobody runs could drift from the product unnoticed."""
    found: list[Run | Copy | Expect] = []
    pending: tuple[str, str] | None = None  # the comment that names the next block
    lines = iter(page.splitlines())
    for line in lines:
        if comment := re.fullmatch(r"<!-- (run|setup|copy|expect): (.*) -->", line.strip()):
            kind, body = comment.groups()
            if kind in ("run", "setup"):
                pending = (kind, body)
            elif kind == "copy":
                match = re.fullmatch(r"(\S+):(\S+) -> (\S+):(\S+)(?: except (\S+))?", body)
                assert match, f"copy comment not understood: {body}"
                found.append(Copy((match[1], match[2]), (match[3], match[4]), match[5]))
            else:
                found.append(Expect(body))
        elif fence := re.fullmatch(r"```(\w+)", line.strip()):
            text = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                text.append(inner)
            assert pending is not None, f"a ```{fence[1]} block with no run/setup comment before it:\n" + "\n".join(text)
            if pending[0] == "run":
                found.append(Run(pending[1], fence[1], "\n".join(text)))
            pending = None
    return found


def commands(script: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", script)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split(" && ")]
    return out


def test_every_block_of_the_page_is_run_or_marked_set_up() -> None:
    found = steps(DOC.read_text())
    hosts = {s.host for s in found if isinstance(s, Run)}
    assert hosts == {"offline", "operator", "gw-0001", "gw-0002", "gw-0003"}, hosts
    assert sum(isinstance(s, Expect) for s in found) >= 4


# -- the machines -----------------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    root: Path
    namespace: netlab.Namespace | None  # None: the offline machine, no network at all
    units: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "work"  # the shell's working directory: a checkout's relative paths live here

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def localise(self, text: str) -> str:
        for prefix in PATHS:
            text = re.sub(rf"(?<![\w./-]){re.escape(prefix)}(?=[/\s\"']|$)", str(self.path(prefix)), text, flags=re.M)
        return text


class Lab:
    def __init__(self, base: Path, lab: netlab.NatLab) -> None:
        self.base, self.lab = base, lab
        self.hosts: dict[str, Host] = {}
        self.netns_dirs: list[Path] = []
        self.bin = base / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "edgeswarm"  # what `pip install edgeswarm` puts on PATH
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m services.cli \"$@\"\n")
        wrapper.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                    "EDGESWARM_KEY_PASSPHRASE": PASSPHRASE, "COLUMNS": "200"}
        self.env.pop("EDGESWARM_HOME", None)

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            namespace = None if name == "offline" else self.lab.add_wan_host(name)
            host = Host(name, self.base / name, namespace)
            host.work.mkdir(parents=True)
            if namespace is not None:
                self._hosts_file(namespace)
            self.hosts[name] = host
        return self.hosts[name]

    def _hosts_file(self, namespace: netlab.Namespace) -> None:
        operator = self.hosts["operator"].namespace if "operator" in self.hosts else namespace
        assert operator is not None
        # /etc/netns itself stays: iproute2's place for these, and another suite's lab may be using it.
        directory = Path("/etc/netns") / namespace.name
        directory.mkdir(parents=True, exist_ok=True)
        self.netns_dirs.append(directory)
        (directory / "hosts").write_text(f"127.0.0.1 localhost\n{operator.ip} {BROKER_NAME}\n")

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        return argv if host.namespace is None else ["ip", "netns", "exec", host.namespace.name, *argv]

    def shell(self, host: Host, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(host, ["bash", "-c", "set -euo pipefail; " + host.localise(command)]),
                                capture_output=True, text=True, cwd=cwd, env=self.env, timeout=scaled(180),
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"on {host.name}: {command}\n{result.stdout}\n{result.stderr}"
        return result

    def run_block(self, step: Run) -> None:
        host = self.host(step.host)
        if step.language == "toml":
            first, _, body = step.text.partition("\n")
            assert first.startswith("# /"), f"a settings block names its file on its first line: {first}"
            target = host.path(first[2:].strip())
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(host.localise(step.text) + "\n")
            return
        cwd = host.work
        for command in commands(step.text):
            if command.startswith("cd "):
                cwd = Path(host.localise(command[3:].strip()))
            elif command.startswith("systemctl "):
                self.systemctl(host, shlex.split(command)[1:])
            elif not command.startswith(HANDLED):
                self.shell(host, command, cwd)

    # -- systemd, as far as these units need it ------------------------------------------------

    def systemctl(self, host: Host, args: list[str]) -> None:
        verb, rest = args[0], args[1:]
        units = [a for a in rest if not a.startswith("-")]
        if verb == "daemon-reload":
            return
        if verb == "enable" and "--now" in rest:
            for unit in units:
                self.start_unit(host, unit)
        elif verb == "disable" and "--now" in rest:
            for unit in units:
                process = host.units.pop(unit)
                process.send_signal(signal.SIGTERM)
                process.wait(scaled(30))
        elif verb == "reload":
            for unit in units:
                reload = unit_file(unit)["ExecReload"]
                assert reload == "/bin/kill -HUP $MAINPID", reload
                os.kill(host.units[unit].pid, signal.SIGHUP)  # `ip netns exec` execs the unit: its PID is MAINPID
        else:
            raise AssertionError(f"systemctl {' '.join(args)}: not a step this test knows")

    def start_unit(self, host: Host, unit: str) -> None:
        assert host.namespace is not None
        fields = unit_file(unit)
        env = dict(self.env)
        for assignment in fields.get("Environment", "").split("\n"):
            if assignment:
                key, _, value = host.localise(assignment).partition("=")
                env[key] = value
        environment_file = fields.get("EnvironmentFile", "")
        if environment_file:
            path = Path(host.localise(environment_file.lstrip("-")))
            if path.exists():
                env.update(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            else:
                assert environment_file.startswith("-"), f"{unit}: {path} missing"
        if "StateDirectory" in fields:
            state = host.path(f"/var/lib/{fields['StateDirectory']}")
            state.mkdir(parents=True, exist_ok=True)
            state.chmod(int(fields.get("StateDirectoryMode", "0755"), 8))
        argv = shlex.split(host.localise(fields["ExecStart"]).replace("/usr/local/bin/edgeswarm", str(self.bin / "edgeswarm")))
        process = self.lab.popen(host.namespace, argv, f"{host.name}-{unit}.log", env=env, cwd=host.work)
        host.units[unit] = process
        time.sleep(0.5)
        assert process.poll() is None, f"{unit} on {host.name} exited: {self.log(host, unit)}"

    def log(self, host: Host, unit: str) -> str:
        path = self.lab.workdir / f"{host.name}-{unit}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # -- what a person does between machines --------------------------------------------------

    def copy(self, step: Copy) -> None:
        source_host, target_host = self.host(step.source[0]), self.host(step.target[0])
        source = source_host.work / step.source[1] if not step.source[1].startswith("/") else source_host.path(step.source[1])
        target = target_host.path(step.target[1]) if step.target[1].startswith("/") else target_host.work / step.target[1]
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            return
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if step.exclude and relative.match(step.exclude):
                continue
            destination = target / relative
            if path.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".toml":  # settings name paths of the machine they are on
                destination.write_text(device_settings(target_host, path.read_text()))
                destination.chmod(path.stat().st_mode & 0o777)
            else:
                shutil.copy2(path, destination)

    # -- checks -------------------------------------------------------------------------------

    def cli_json(self, host: Host, *args: str) -> dict:
        result = subprocess.run(self.argv(host, [str(self.bin / "edgeswarm"), *args, "--json"]), capture_output=True,
                                text=True, cwd=host.work, env=self.env, timeout=scaled(60), stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait(self, what: str, check, timeout: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + scaled(timeout)
        last = None
        while time.monotonic() < deadline:
            ok, last = check()
            if ok:
                return
            time.sleep(1.0)
        units = "\n".join(f"--- {h.name} {u}\n{self.log(h, u)}" for h in self.hosts.values() for u in h.units)
        raise AssertionError(f"{what}: last seen {last}\n{units}")

    def expect(self, step: Expect) -> None:
        operator = self.hosts["operator"]
        settings = "/etc/edgeswarm/operator.toml"
        if match := re.fullmatch(r"((?:gw-\d+ )+)run (\S+)", step.what):
            devices, version = match[1].split(), match[2]

            def check() -> tuple[bool, object]:
                status = {d["device"]: d for d in self.cli_json(operator, "fleet", "status", "--config", operator.localise(settings))["devices"]}
                seen = {d: (status.get(d, {}).get("installed_version"), status.get(d, {}).get("phase")) for d in devices}
                return all(v == version and p in ("idle", "done") for v, p in seen.values()), seen

            self.wait(step.what, check, 240)
            for device in devices:  # each still logs in with the password it was given: nobody's was changed
                on_device = tomllib.loads(self.hosts[device].path("/etc/edgeswarm/device.toml").read_text())["mqtt"]
                at_broker = tomllib.loads(operator.path(f"/etc/edgeswarm/broker/credentials/{device}.toml").read_text())["mqtt"]
                assert on_device["password"] == at_broker["password"], device
        elif match := re.fullmatch(r"rollout (\S+) completed", step.what):
            def check() -> tuple[bool, object]:
                found = self.cli_json(operator, "rollout", "status", match[1], "--config",
                                      operator.localise("/etc/edgeswarm/service.toml"))["rollouts"]
                return bool(found) and found[0]["state"] == "completed", found

            self.wait(step.what, check, 300)
        elif match := re.fullmatch(r"(gw-\d+) refused and retired", step.what):
            device = self.hosts[match[1]]
            login = tomllib.loads(device.path("/etc/edgeswarm/device.toml").read_text())["mqtt"]
            probe = device.work / "probe.toml"
            probe.write_text('fleet = "plant-7"\n[mqtt]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in login.items()))
            refused = subprocess.run(self.argv(device, [str(self.bin / "edgeswarm"), "fleet", "status", "--config", str(probe)]),
                                     capture_output=True, text=True, env=self.env, timeout=scaled(60), stdin=subprocess.DEVNULL)
            assert refused.returncode != 0 and "Not authorized" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr

            def check() -> tuple[bool, object]:
                listed = [d["device"] for d in self.cli_json(operator, "fleet", "status", "--config", operator.localise(settings))["devices"]]
                return match[1] not in listed, listed

            self.wait(step.what, check, 60)
        else:
            raise AssertionError(f"expect comment not understood: {step.what}")

    def close(self) -> None:
        for directory in self.netns_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def device_settings(host: Host, text: str) -> str:
    """Settings as they read on `host`: its paths, except the install target, which is what releases
    name (a path on the device) and resolves under the device's sysroot, here the host's directory."""
    localised = host.localise(text)
    target = re.search(r"^install_target = .*$", text, flags=re.M)
    if target is None:
        return localised
    return re.sub(r"^install_target = .*$", f"{target[0]}\nsysroot = {json.dumps(str(host.root))}", localised,
                  count=1, flags=re.M)


def unit_file(unit: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in (REPO / "config" / "systemd" / f"{unit}.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields[key] = f"{fields[key]}\n{value}" if key in fields else value
    return fields


@pytest.mark.timeout(900)
def test_the_deploy_guide_works_as_written() -> None:
    base = Path(tempfile.mkdtemp(prefix="edgeswarm-deploy-"))
    base.chmod(0o755)  # Mosquitto drops to its own user, which must reach its files in here
    try:
        with netlab.NatLab(base / "lab") as natlab:
            lab = Lab(base, natlab)
            try:
                lab.host("operator")  # first: the others' hosts files point at it
                build = lab.host("operator").work / "build"
                build.mkdir()
                build_image("gateway-armv7", "1.0.0", build / "gateway-1.0.0.img")
                build_image("gateway-armv7", "2.0.0", build / "gateway-1.1.0.img")
                for step in steps(DOC.read_text()):
                    if isinstance(step, Run):
                        lab.run_block(step)
                    elif isinstance(step, Copy):
                        lab.copy(step)
                    else:
                        lab.expect(step)
                operator = lab.hosts["operator"]
                # The devices run the 1.1.0 image, byte for byte.
                for name in ("gw-0001", "gw-0003"):
                    installed = lab.hosts[name].path("/opt/edgeswarm/firmware.img").read_bytes()
                    assert installed == (operator.work / "build" / "gateway-1.1.0.img").read_bytes(), name
                assert "fleet service for plant-7" in lab.log(operator, "edgeswarm-fleet")
            finally:
                lab.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
