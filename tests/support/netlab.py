"""A NAT lab in network namespaces: a WAN segment, NAT routers, devices behind them (issue #7).

    WAN bridge 10.99.0.0/24 (in its own namespace)
     ├── hosts on the WAN: origin, broker, STUN (10.99.0.1, .2, ...)
     ├── router r1  10.99.0.11 ── LAN 10.101.0.0/24 ── devices 10.101.0.10, .11, ...
     ├── router r2  10.99.0.12 ── LAN 10.102.0.0/24 ── ...
     └── ...        a router may also sit on another router's LAN (double NAT)

Router kinds: `masquerade` (plain MASQUERADE: endpoint-independent mapping, full-cone-like),
`symmetric` (MASQUERADE --random-fully: a new external port per destination) and `upnp`
(MASQUERADE plus Debian's miniupnpd answering UPnP IGD and NAT-PMP on the LAN, with its external
address learnt from a real STUN server, coturn, on the WAN). Routers keep the legacy iptables
tables throughout, because miniupnpd-iptables writes those.

Only private addresses, only inside namespaces made here; no namespace has a default route, so
nothing can leave the machine. Every namespace, and every process started in one, is removed
by `close()`, which the context manager calls even on failure or Ctrl-C. Needs root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

RouterKind = Literal["masquerade", "symmetric", "upnp"]
WAN_NET = "10.99.0"
IPT = "iptables-legacy"
CUT_CHAIN = "ES_CUT"  # a router's uplink cut: DROP while it holds a rule, empty when restored


class LabError(RuntimeError):
    pass


def available() -> str | None:
    """None when a lab can be built here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", IPT, "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


def upnp_available() -> str | None:
    for tool, package in (("miniupnpd", "miniupnpd-iptables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install {package})"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class Namespace:
    name: str
    ip: str = ""  # its address on the segment it hangs off (WAN or a router's LAN)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.name, *argv, check=check)


@dataclass
class Router(Namespace):
    kind: RouterKind = "masquerade"
    index: int = 0
    lan_prefix: str = ""  # e.g. 10.101.0
    devices: list[Namespace] = field(default_factory=list)

    @property
    def lan_ip(self) -> str:
        return f"{self.lan_prefix}.1"


class NatLab:
    """`with NatLab(workdir) as lab:` builds nothing yet; add_* build, close() removes everything."""

    def __init__(self, workdir: Path) -> None:
        why = available()
        if why:
            raise LabError(why)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.tag = secrets.token_hex(2)  # namespaces of two labs on one machine never collide
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.routers: list[Router] = []
        self.hosts: list[Namespace] = []
        self._links = 0
        self._outer_ends: dict[str, str] = {}  # inner namespace -> its veth's other end (on the bridge side)
        self.wan = self._namespace("wan")
        self.wan.run("ip", "link", "add", "br0", "type", "bridge")
        self.wan.run("ip", "link", "set", "br0", "up")

    # -- building ---------------------------------------------------------------------------

    def _namespace(self, role: str) -> Namespace:
        name = f"es{self.tag}-{role}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        ns = Namespace(name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def _link(self, inner: Namespace, inner_if: str, outer: Namespace, bridge: str) -> None:
        """A veth pair: `inner_if` inside `inner`, the other end enslaved to `bridge` in `outer`."""
        self._links += 1
        a, b = f"es{self.tag}a{self._links}", f"es{self.tag}b{self._links}"
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", a, "netns", inner.name)
        _run("ip", "link", "set", b, "netns", outer.name)
        inner.run("ip", "link", "set", a, "name", inner_if)
        inner.run("ip", "link", "set", inner_if, "up")
        outer.run("ip", "link", "set", b, "master", bridge)
        outer.run("ip", "link", "set", b, "up")
        self._outer_ends[inner.name] = b

    def lan_port(self, device: Namespace) -> str:
        """The router-side end of a device's link: shape it to limit what the device receives."""
        return self._outer_ends[device.name]

    def add_wan_host(self, role: str) -> Namespace:
        host = self._namespace(role)
        host.ip = f"{WAN_NET}.{len(self.hosts) + 1}"
        self._link(host, "eth0", self.wan, "br0")
        host.run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        self.hosts.append(host)
        return host

    def add_router(self, kind: RouterKind = "masquerade", behind: Router | None = None) -> Router:
        index = len(self.routers) + 1
        ns = self._namespace(f"r{index}")
        router = Router(ns.name, kind=kind, index=index, lan_prefix=f"10.{100 + index}.0")
        if behind is None:
            router.ip = f"{WAN_NET}.{10 + index}"
            self._link(router, "eth0", self.wan, "br0")
            router.run("ip", "addr", "add", f"{router.ip}/24", "dev", "eth0")
        else:
            router.ip = f"{behind.lan_prefix}.{200 + index}"
            self._link(router, "eth0", behind, "br0")
            router.run("ip", "addr", "add", f"{router.ip}/24", "dev", "eth0")
            router.run("ip", "route", "add", f"{WAN_NET}.0/24", "via", behind.lan_ip)
        router.run("ip", "link", "add", "br0", "type", "bridge")
        router.run("ip", "addr", "add", f"{router.lan_ip}/24", "dev", "br0")
        router.run("ip", "link", "set", "br0", "up")
        router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        masquerade = [IPT, "-t", "nat", "-A", "POSTROUTING", "-s", f"{router.lan_prefix}.0/24", "-o", "eth0", "-j", "MASQUERADE"]
        router.run(*masquerade, *(["--random-fully"] if kind == "symmetric" else []))
        # A NAT lets in only what answers traffic from inside (or what miniupnpd maps).
        router.run(IPT, "-A", "FORWARD", "-i", "eth0", "-o", "br0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        if kind == "upnp":
            for table, chain, hook in (("nat", "MINIUPNPD", "PREROUTING"), ("filter", "MINIUPNPD", "FORWARD")):
                router.run(IPT, "-t", table, "-N", chain)
                router.run(IPT, "-t", table, "-A", hook, "-i", "eth0", "-j", chain)
            router.run(IPT, "-t", "nat", "-N", "MINIUPNPD-POSTROUTING")
            router.run(IPT, "-t", "nat", "-I", "POSTROUTING", "-o", "eth0", "-j", "MINIUPNPD-POSTROUTING")
        router.run(IPT, "-A", "FORWARD", "-i", "eth0", "-o", "br0", "-j", "DROP")
        self.routers.append(router)
        return router

    def forward_port(self, router: Router, device: Namespace, outside: int, inside: int = 4001) -> str:
        """A static port forward (what an operator configures on a router by hand): TCP `outside` on the
        router's WAN address reaches `device`:`inside`. Returns the multiaddr it makes the device
        reachable at."""
        router.run(IPT, "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp", "--dport", str(outside),
                   "-j", "DNAT", "--to-destination", f"{device.ip}:{inside}")
        router.run(IPT, "-I", "FORWARD", "1", "-i", "eth0", "-o", "br0", "-p", "tcp", "-d", device.ip,
                   "--dport", str(inside), "-j", "ACCEPT")
        return f"/ip4/{router.ip}/tcp/{outside}"

    def add_device(self, router: Router, role: str) -> Namespace:
        device = self._namespace(role)
        device.ip = f"{router.lan_prefix}.{10 + len(router.devices)}"
        self._link(device, "eth0", router, "br0")
        device.run("ip", "addr", "add", f"{device.ip}/24", "dev", "eth0")
        device.run("ip", "route", "add", f"{WAN_NET}.0/24", "via", router.lan_ip)
        router.devices.append(device)
        return device

    def move_device(self, device: Namespace, router: Router) -> str:
        """Unplug `device` from its router's LAN and plug it into `router`'s (a vehicle that drives to
        another depot): the same interface, a new address on the new LAN, the route through the new
        router. Its processes keep running; returns its new address."""
        old = next(r for r in self.routers if device in r.devices)
        outer = self._outer_ends[device.name]
        old.run("ip", "link", "set", outer, "netns", router.name)
        old.devices.remove(device)
        router.run("ip", "link", "set", outer, "master", "br0")
        router.run("ip", "link", "set", outer, "up")
        device.ip = f"{router.lan_prefix}.{10 + len(router.devices) + 50 * old.index}"
        device.run("ip", "addr", "flush", "dev", "eth0")
        device.run("ip", "addr", "add", f"{device.ip}/24", "dev", "eth0")
        device.run("ip", "route", "replace", f"{WAN_NET}.0/24", "via", router.lan_ip)
        router.devices.append(device)
        return device.ip

    def add_wan_link(self, device: Namespace) -> str:
        """A second link for a device behind a router, straight onto the WAN (a cellular modem beside
        the LAN's cable): the WAN is then reached through it. Returns its WAN address."""
        address = f"{WAN_NET}.{150 + len(self.hosts) + self._links}"
        self._link(device, "eth1", self.wan, "br0")
        device.run("ip", "addr", "add", f"{address}/24", "dev", "eth1")
        device.run("ip", "route", "replace", f"{WAN_NET}.0/24", "dev", "eth1", "src", address)
        return address

    def firewall(self, router: Router, blocked: str) -> None:
        """The router drops everything its LAN sends to, or receives from, `blocked` (an address):
        a plant firewall that lets nothing towards the broker and the origin through."""
        for side in ("-d", "-s"):
            router.run(IPT, "-I", "FORWARD", "1", side, blocked, "-j", "DROP")

    def shape(self, ns: Namespace, *, rate_mbit: float | None = None, delay_ms: float = 0, loss_percent: float = 0,
              interface: str = "eth0") -> None:
        """Shape what `ns` sends on `interface` (its uplink): rate with tbf; delay and loss with netem.

        netem is a kernel module some kernels lack (this machine's among them). Without it, loss is
        random drops by iptables (`statistic` match) and the rate stays tbf; delay raises LabError
        instead of silently running undelayed.
        """
        if loss_percent and not delay_ms and not _netem_available(ns, interface):
            for chain in ("OUTPUT", "FORWARD"):
                ns.run(IPT, "-A", chain, "-o", interface, "-m", "statistic", "--mode", "random",
                       "--probability", f"{loss_percent / 100:.4f}", "-j", "DROP")
            loss_percent = 0
        if delay_ms or loss_percent:
            netem = ["netem", *(["delay", f"{delay_ms}ms"] if delay_ms else []),
                     *(["loss", f"{loss_percent}%"] if loss_percent else []),
                     *(["rate", f"{rate_mbit}mbit"] if rate_mbit else [])]
            result = ns.run("tc", "qdisc", "replace", "dev", interface, "root", *netem, check=False)
            if result.returncode != 0:
                raise LabError(f"netem (delay/loss) is not available here: {result.stderr.strip()}")
            return
        if rate_mbit:
            burst = max(int(rate_mbit * 1e6 / 8 / 250), 16 * 1024)  # one timer tick's worth at HZ=250
            ns.run("tc", "qdisc", "replace", "dev", interface, "root", "tbf", "rate", f"{rate_mbit}mbit",
                   "burst", str(burst), "latency", "200ms")

    # -- faults ------------------------------------------------------------------------------

    def cut_uplink(self, router: Router) -> None:
        """The router's WAN side goes dark: nothing in or out through eth0 (its LAN still works).
        Conntrack and NAT mappings stay, as on a router whose upstream link failed."""
        if router.run(IPT, "-n", "-L", CUT_CHAIN, check=False).returncode != 0:
            router.run(IPT, "-N", CUT_CHAIN)
            for chain, side in (("FORWARD", "-i"), ("FORWARD", "-o"), ("INPUT", "-i"), ("OUTPUT", "-o")):
                router.run(IPT, "-I", chain, "1", side, "eth0", "-j", CUT_CHAIN)
        router.run(IPT, "-F", CUT_CHAIN)
        router.run(IPT, "-A", CUT_CHAIN, "-j", "DROP")

    def restore_uplink(self, router: Router) -> None:
        router.run(IPT, "-F", CUT_CHAIN, check=False)

    def lose(self, ns: Namespace, percent: float, interface: str = "eth0") -> None:
        """Drop `percent` of the packets `ns` sends and receives on `interface`, at random (the
        `statistic` match: works where netem is missing, and leaves any rate shaping alone)."""
        for chain, side in (("INPUT", "-i"), ("OUTPUT", "-o")):
            ns.run(IPT, "-I", chain, "1", side, interface, "-m", "statistic", "--mode", "random",
                   "--probability", f"{percent / 100:.4f}", "-j", "DROP")

    # -- services inside the lab -------------------------------------------------------------

    def popen(self, ns: Namespace, argv: list[str], log_name: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "ab")
        process = subprocess.Popen(["ip", "netns", "exec", ns.name, *argv], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=cwd,
                                   start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def start_stun(self, host: Namespace, port: int = 3478) -> None:
        """coturn as a plain STUN server on a WAN host (what miniupnpd asks for its external address)."""
        turnserver = shutil.which("turnserver") or "/usr/bin/turnserver"
        # RFC 5780 (the NAT behaviour tests miniupnpd runs) needs a second address to answer from.
        alternate = f"{WAN_NET}.{200 + len(self.hosts)}"
        host.run("ip", "addr", "add", f"{alternate}/24", "dev", "eth0")
        self.popen(host, [turnserver, "-n", "--stun-only", "--no-cli", f"--listening-ip={host.ip}",
                          f"--listening-ip={alternate}", f"--listening-port={port}", f"--alt-listening-port={port + 1}",
                          "--log-file=stdout", "--simple-log", "--no-software-attribute", "--no-tls", "--no-dtls",
                          f"--pidfile={self.workdir / 'turnserver.pid'}", f"--userdb={self.workdir / 'turndb'}"],
                   "stun.log")
        self.stun = (host.ip, port)

    def start_upnp(self, router: Router) -> None:
        if router.kind != "upnp":
            raise LabError(f"{router.name} is a {router.kind} router")
        stun_host, stun_port = getattr(self, "stun", (None, None))
        if stun_host is None:
            raise LabError("start_stun() first: miniupnpd refuses a private external address without STUN")
        conf = self.workdir / f"miniupnpd-{router.index}.conf"
        conf.write_text("\n".join([
            "ext_ifname=eth0",
            "listening_ip=br0",
            "enable_upnp=yes",
            "enable_natpmp=yes",
            "secure_mode=no",
            "system_uptime=yes",
            "ext_perform_stun=yes",
            f"ext_stun_host={stun_host}",
            f"ext_stun_port={stun_port}",
            f"uuid=3f7a2b1c-0000-4000-8000-{router.index:012d}",
            f"allow 1024-65535 {router.lan_prefix}.0/24 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]))
        miniupnpd = shutil.which("miniupnpd") or "/usr/sbin/miniupnpd"
        # Its own pid file: the default one is shared by every namespace (and by a second lab on the machine).
        self.popen(router, [miniupnpd, "-f", str(conf), "-d", "-P", str(self.workdir / f"miniupnpd-{router.index}.pid")],
                   f"miniupnpd-{router.index}.log")
        # A router is up before the devices behind it: wait until it answers NAT-PMP.
        log = self.workdir / f"miniupnpd-{router.index}.log"
        deadline = time.monotonic() + 30
        while "Listening for NAT-PMP" not in (log.read_text(errors="replace") if log.exists() else ""):
            if time.monotonic() > deadline:
                raise LabError(f"miniupnpd in {router.name} did not start: {log.read_text()[-1000:]}")
            time.sleep(0.1)

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process started in the lab, then delete every namespace; never raises."""
        try:
            for process in reversed(self.processes):
                _signal(process, signal.SIGTERM)
            deadline = time.monotonic() + 10
            for process in self.processes:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal(process, signal.SIGKILL)
                    process.wait()
        finally:
            for name in reversed(self.namespaces):
                # Whatever still runs inside (a child that escaped its group) goes with the namespace.
                for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                _run("ip", "netns", "delete", name, check=False)  # its veths, and their peers, go with it
            self.namespaces.clear()

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)  # popen() starts every process as its own group leader
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def _netem_available(ns: Namespace, interface: str) -> bool:
    probe = ns.run("tc", "qdisc", "replace", "dev", interface, "root", "netem", "loss", "0%", check=False)
    if probe.returncode != 0:
        return False
    ns.run("tc", "qdisc", "del", "dev", interface, "root", check=False)
    return True


def leftover_namespaces() -> list[str]:
    """Namespaces of labs that were not closed (e.g. the process was SIGKILLed)."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("es") and "-" in line.split()[0]]
