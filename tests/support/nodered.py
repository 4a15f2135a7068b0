"""A real Node-RED for the integration tests: installed once with npm into a cache, started headless.

`npm install node-red@4.1` takes ~15 s the first time (~80 MB under ~/.cache/edgeswarm/node-red);
the admin API (no auth, bound to 127.0.0.1) deploys flows and fires inject nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.demo.processes import terminate
from tests.support.deadlines import scaled

VERSION = "4.1"
CACHE = Path(os.environ.get("EDGESWARM_NODERED_CACHE", Path.home() / ".cache" / "edgeswarm" / "node-red"))
RED_JS = CACHE / "node_modules" / "node-red" / "red.js"


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def ensure_installed() -> Path:
    if RED_JS.exists():
        return RED_JS
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"node-red@{VERSION}"],
                   cwd=CACHE, check=True, stdout=subprocess.DEVNULL)
    return RED_JS


SETTINGS = """module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    userDir: {user_dir},
    flowFile: "flows.json",
    credentialSecret: "edgeswarm-test",
    httpAdminRoot: "/",
    httpNodeRoot: "/",
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
    editorTheme: {{ tours: false }},
}};
"""


@dataclass
class NodeRed:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def request(self, method: str, path: str, body: object | None = None, headers: dict[str, str] | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=30) as response:
            raw = response.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode()

    def deploy(self, nodes: list[dict]) -> None:
        self.request("POST", "/flows", nodes, {"Node-RED-Deployment-Type": "full"})

    def inject(self, node_id: str) -> None:
        self.request("POST", f"/inject/{node_id}")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Until `text` appears in Node-RED's log (how its nodes say they connected, for one)."""
        end = time.monotonic() + scaled(timeout)
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > end or self.process.poll() is not None:
                raise TimeoutError(f"Node-RED never logged {text!r}: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        terminate(self.process, timeout=20)


def start(user_dir: Path, port: int, env: dict[str, str], *, timeout: float = 60) -> NodeRed:
    red = ensure_installed()
    user_dir.mkdir(parents=True, exist_ok=True)
    settings = user_dir / "settings.js"
    settings.write_text(SETTINGS.format(port=port, user_dir=json.dumps(str(user_dir))))
    log = user_dir / "node-red.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["node", str(red), "--settings", str(settings)], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **env}, start_new_session=True)
    red_ = NodeRed(f"http://127.0.0.1:{port}", process, log)
    timeout = scaled(timeout)
    end = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Node-RED exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            red_.request("GET", "/settings")
            return red_
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > end:
                red_.stop()
                raise TimeoutError(f"Node-RED did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}") from None
            time.sleep(0.3)
