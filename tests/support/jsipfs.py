"""A js-ipfs daemon with an RPC API, for testing the kubo-rpc backend (config/js-ipfs/README.md).

Its config keeps it on loopback: no bootstrap list, no delegate routers, no preload nodes, no
MDNS, no webRTCStar; the test stops it by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from services.demo.processes import terminate
from tests.support.harness import wait_port

JS_IPFS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeswarm" / "js-ipfs"


def js_ipfs_available() -> bool:
    return shutil.which("node") is not None and (JS_IPFS_DIR / "node_modules" / ".bin" / "jsipfs").exists()


class JsIpfsDaemon:
    def __init__(self, repo: Path, swarm_port: int, api_port: int, log_file: Path) -> None:
        self.repo, self.swarm_port, self.api_port, self.log_file = repo, swarm_port, api_port, log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.api_port}/http"

    def _command(self, *args: str) -> list[str]:
        return ["node", "--require", str(JS_IPFS_DIR / "preload.cjs"), str(JS_IPFS_DIR / "node_modules" / ".bin" / "jsipfs"), *args]

    def start(self) -> None:
        env = {**os.environ, "IPFS_PATH": str(self.repo)}
        if not (self.repo / "config").exists():
            subprocess.run(self._command("init", "--empty-repo"), env=env, check=True, capture_output=True, timeout=120)
        config = json.loads((self.repo / "config").read_text())
        config["Addresses"].update({
            "Swarm": [f"/ip4/127.0.0.1/tcp/{self.swarm_port}"], "API": f"/ip4/127.0.0.1/tcp/{self.api_port}",
            "Gateway": "", "RPC": "", "Delegates": [], "Announce": [], "NoAnnounce": [],
        })
        config["Bootstrap"] = []
        config["Discovery"] = {"MDNS": {"Enabled": False}, "webRTCStar": {"Enabled": False}}
        (self.repo / "config").write_text(json.dumps(config, indent=1))
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self._command("daemon", "--enable-preload=false"), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.api_port, timeout=90)

    def stop(self) -> None:
        terminate(self.proc, timeout=15)
