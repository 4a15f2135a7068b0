"""Install handlers never write through a link, refuse unsafe directories and undo idempotently (issues 20, 23).

Each planted link points at a victim file outside the install directory; every test checks the
victim's bytes and mode afterwards, not only that an error was raised.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from device_client.installer import ABInstaller, FileInstaller, InstallError, UnsafePath, check_install_directory


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(install dir with firmware.img = v1, the new image v2, a victim outside)."""
    install = tmp_path / "install"
    install.mkdir(mode=0o755)
    (install / "firmware.img").write_bytes(b"v1")
    new = tmp_path / "v2.img"
    new.write_bytes(b"v2")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    return install, new, victim


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == b"precious" and victim.stat().st_mode & 0o777 == 0o600


def test_a_link_planted_at_the_staging_name_is_replaced_not_written_through(site: tuple[Path, Path, Path]) -> None:
    install, new, victim = site
    os.symlink(victim, install / ".firmware.img.staged")
    FileInstaller(install / "firmware.img").install(new)
    assert untouched(victim)
    assert (install / "firmware.img").read_bytes() == b"v2" and not (install / "firmware.img").is_symlink()
    assert not os.path.lexists(install / ".firmware.img.staged")


def test_a_link_planted_at_previous_is_replaced_and_never_rolled_back_to(site: tuple[Path, Path, Path]) -> None:
    install, new, victim = site
    os.symlink(victim, install / "firmware.img.previous")
    installer = FileInstaller(install / "firmware.img")
    installer.install(new)
    assert not (install / "firmware.img.previous").is_symlink()
    assert (install / "firmware.img.previous").read_bytes() == b"v1" and untouched(victim)
    # Replaced by a link again after the install: a rollback refuses it instead of installing the victim.
    (install / "firmware.img.previous").unlink()
    os.symlink(victim, install / "firmware.img.previous")
    with pytest.raises(InstallError, match="previous"):
        installer.rollback(None, sha(b"v1"))
    assert (install / "firmware.img").read_bytes() == b"v2" and untouched(victim)


def test_a_file_target_that_is_a_link_is_refused(site: tuple[Path, Path, Path]) -> None:
    install, new, victim = site
    (install / "firmware.img").unlink()
    os.symlink(victim, install / "firmware.img")
    installer = FileInstaller(install / "firmware.img")
    with pytest.raises(UnsafePath, match="not a regular file"):
        installer.prepare()
    with pytest.raises(UnsafePath):
        installer.install(new)
    assert untouched(victim) and not os.path.lexists(install / "firmware.img.previous")


@pytest.mark.parametrize("value", ["../victim", "firmware.img.slot-c", "/etc/passwd", "slot"],
                         ids=["outside", "third-slot", "absolute", "no-dash"])
def test_an_ab_target_linking_anywhere_but_its_slots_is_refused_with_a_reason(site: tuple[Path, Path, Path],
                                                                              value: str) -> None:
    """The relative link without a dash used to raise IndexError and crash-loop the agent."""
    install, new, victim = site
    (install / "firmware.img").unlink()
    os.symlink(value, install / "firmware.img")
    ab = ABInstaller(install / "firmware.img")
    with pytest.raises(UnsafePath, match="not to one of its slots"):
        ab.prepare()
    with pytest.raises(UnsafePath):
        ab.install(new)
    assert untouched(victim)


def test_an_ab_slot_that_is_a_link_is_refused_and_a_staged_slot_link_is_not_followed(
        site: tuple[Path, Path, Path]) -> None:
    install, new, victim = site
    ab = ABInstaller(install / "firmware.img")
    assert ab.prepare() == "a"  # adopts the plain file
    os.symlink(victim, install / ".firmware.img.slot-b.staged")
    os.symlink(victim, install / "firmware.img.slot-b")
    ab.install(new)  # slot b is replaced by a new file, not written through
    assert untouched(victim) and ab.active() == "b" and (install / "firmware.img").read_bytes() == b"v2"
    assert not (install / "firmware.img.slot-b").is_symlink()
    (install / "firmware.img.slot-a").unlink()
    os.symlink(victim, install / "firmware.img.slot-a")
    with pytest.raises(InstallError, match="no slot"):
        ab.rollback("a", sha(b"v1"))  # slot a is a link now: never pointed at, never hashed through
    assert ab.active() == "b" and untouched(victim)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_an_install_directory_others_may_write_is_refused(site: tuple[Path, Path, Path], mode: int) -> None:
    install, new, _ = site
    install.chmod(mode)
    with pytest.raises(UnsafePath, match="writable by group or others"):
        check_install_directory(install)
    with pytest.raises(UnsafePath):
        FileInstaller(install / "firmware.img").install(new)
    assert (install / "firmware.img").read_bytes() == b"v1"


def test_file_rollback_is_an_undo_that_can_run_twice(site: tuple[Path, Path, Path]) -> None:
    install, new, _ = site
    installer = FileInstaller(install / "firmware.img")
    installer.install(new)
    for _ in range(3):
        installer.rollback(None, sha(b"v1"))
        assert (install / "firmware.img").read_bytes() == b"v1"


def test_ab_rollback_goes_to_the_recorded_slot_or_the_one_holding_the_old_bytes(site: tuple[Path, Path, Path]) -> None:
    install, new, _ = site
    ab = ABInstaller(install / "firmware.img")
    back_to = ab.prepare()
    ab.install(new)
    for recorded in (back_to, None, back_to):  # with the slot recorded, and with none (found by hash)
        ab.rollback(recorded, sha(b"v1"))
        assert ab.active() == "a" and (install / "firmware.img").read_bytes() == b"v1"
    ab.install(new)
    with pytest.raises(InstallError, match="no slot"):
        ab.rollback("a", sha(b"v0"))  # bytes no slot holds: it does not flip to "the other one"
    assert ab.active() == "b"


def test_an_ab_device_left_without_its_pointer_by_an_interrupted_adoption_recovers(
        site: tuple[Path, Path, Path]) -> None:
    """What an older agent left after a cut while adopting: the file renamed into slot a, no link."""
    install, new, _ = site
    os.replace(install / "firmware.img", install / "firmware.img.slot-a")
    ab = ABInstaller(install / "firmware.img")
    assert ab.active_sha256() == sha(b"v1") and ab.active() == "a"
    ab.install(new)
    assert (install / "firmware.img").read_bytes() == b"v2"
