"""A real Home Assistant for the integration tests: installed once into a cached venv, started headless.

Home Assistant 2025.4.4 needs Python >= 3.13; pyenv provides 3.13 on these machines. The venv lives
outside the repository (~/.cache/edgeswarm/homeassistant-<version>) so that only the first run pays
for the install (~90 s, ~820 MB). `python3 -m tests.support.homeassistant` installs it ahead of time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from services.demo.processes import terminate
from tests.support.deadlines import scaled

VERSION = "2025.4.4"
CACHE = Path(os.environ.get("EDGESWARM_HA_CACHE", Path.home() / ".cache" / "edgeswarm" / f"homeassistant-{VERSION}"))
VENV = CACHE / "venv"
HASS = VENV / "bin" / "hass"


def find_python() -> str | None:
    """A Python >= 3.13 interpreter (what this Home Assistant release requires), or None."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (13, 14)]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv_root.is_dir():
        candidates += [str(p / "bin" / "python3") for p in sorted(pyenv_root.iterdir(), reverse=True)
                       if p.name.startswith(("3.13", "3.14"))]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info >= (3, 13))"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == "True":
                return candidate
    return None


def ensure_installed(log=print) -> Path:
    """Install Home Assistant into the cached venv unless it is there already; returns the hass path."""
    marker = CACHE / "installed"
    if marker.exists() and HASS.exists():
        return HASS
    python = find_python()
    if python is None:
        raise FileNotFoundError("no Python >= 3.13 interpreter found (Home Assistant 2025.4 needs one)")
    log(f"installing Home Assistant {VERSION} into {VENV} (once; ~90 s)")
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip", "wheel"], check=True)
    wheels = CACHE / "wheel"
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    f"homeassistant=={VERSION}"], check=True)
    wheel = next(wheels.glob("homeassistant-*.whl"))
    constraints = CACHE / "package_constraints.txt"
    with zipfile.ZipFile(wheel) as zf:
        constraints.write_bytes(zf.read("homeassistant/package_constraints.txt"))
    # What the boot needs (the frontend) and the mqtt integration's own requirement are installed now,
    # so that every boot can use --skip-pip (Home Assistant would otherwise pip-install at start-up).
    subprocess.run(pip + ["-c", str(constraints), str(wheel), "josepy<2", "paho-mqtt==2.1.0", "home-assistant-frontend"],
                   check=True)
    marker.write_text(VERSION)
    return HASS


CONFIGURATION = """\
homeassistant:
  name: edgeswarm test
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
"""


@dataclass
class HomeAssistant:
    """A running Home Assistant with an owner account and the REST API."""

    url: str
    token: str
    process: subprocess.Popen[bytes]

    def request(self, method: str, path: str, body: object | None = None, timeout: float = 30) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
            is_json = response.headers.get_content_type() == "application/json"
        if not raw:
            return None
        return json.loads(raw) if is_json else raw.decode()  # /api/template answers text

    def state(self, entity_id: str) -> dict | None:
        try:
            return self.request("GET", f"/api/states/{entity_id}")  # type: ignore[return-value]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def add_mqtt(self, host: str, port: int, username: str | None = None, password: str | None = None) -> None:
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt", "show_advanced_options": False})
        assert isinstance(flow, dict)
        step: dict[str, object] = {"broker": host, "port": port}
        if username:
            step |= {"username": username, "password": password or ""}
        result = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", step)
        assert isinstance(result, dict)
        if result.get("type") != "create_entry":
            raise RuntimeError(f"Home Assistant did not accept the MQTT broker: {result}")

    def stop(self) -> None:
        terminate(self.process, timeout=30)


def _post_json(url: str, body: object, form: bool = False) -> dict:
    if form:
        data = urllib.parse.urlencode(body).encode()  # type: ignore[arg-type]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    else:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
        return json.loads(response.read())


def start(config_dir: Path, port: int, *, timeout: float = 240) -> HomeAssistant:
    """Boot Home Assistant in `config_dir`, onboard an owner and return a client with its token."""
    hass = ensure_installed()
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(CONFIGURATION.format(port=port))
    with open(config_dir / "hass.out", "wb") as log:
        process = subprocess.Popen([str(hass), "-c", str(config_dir), "--skip-pip"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Home Assistant exited ({process.returncode}); see {config_dir / 'hass.out'}")
        try:
            with urllib.request.urlopen(url + "/api/onboarding", timeout=5) as response:
                steps = json.loads(response.read())
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                terminate(process)
                raise TimeoutError(f"Home Assistant did not answer within {timeout:.0f} s") from None
            time.sleep(1)
    client_id = url + "/"
    if any(s["step"] == "user" and not s["done"] for s in steps):
        created = _post_json(url + "/api/onboarding/users", {
            "client_id": client_id, "name": "edgeswarm", "username": "edgeswarm", "password": "edgeswarm-test-pw",
            "language": "en"})
        code = created["auth_code"]
    else:
        raise RuntimeError(f"{config_dir} was onboarded already; use a fresh directory")
    tokens = _post_json(url + "/auth/token", {"grant_type": "authorization_code", "code": code, "client_id": client_id},
                        form=True)
    ha = HomeAssistant(url, tokens["access_token"], process)
    # Finish onboarding so that HA does not hold integrations back.
    for step in ("core_config", "analytics"):
        try:
            ha.request("POST", f"/api/onboarding/{step}", {})
        except urllib.error.HTTPError:
            pass
    return ha


if __name__ == "__main__":
    print(ensure_installed(), file=sys.stderr)
