"""The daemon's state directory: permissions, the lock, config and the saved session."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.state import SavedSession, StateDir, StateError
from overlay import certificate
from overlay.errors import TrustAnchorError
from overlay.identity import IdentityKey

NOW = 1_700_000_000


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def a_session(ca: IdentityKey | None = None) -> SavedSession:
    ca = ca or IdentityKey.generate()
    user = IdentityKey.generate()
    signed = certificate.issue(ca, "alice", user.public_key, serial=7, now=NOW)
    return SavedSession("alice", b"k" * 32, signed)


# -- prepare ------------------------------------------------------------------------------


def test_prepare_makes_private_directories(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = StateDir(tmp_path / "deep" / "state")
        state.prepare()
    finally:
        os.umask(old)
    assert mode_of(state.path) == 0o700
    assert mode_of(state.path / "keys") == 0o700
    assert state.key_path("alice") == state.path / "keys" / "alice.key"


def test_prepare_tightens_an_existing_open_directory(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(0o755)
    StateDir(path).prepare()
    assert mode_of(path) == 0o700


def test_prepare_on_a_file_names_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a directory")
    with pytest.raises(StateError, match=re.escape(f"Cannot use the state directory {path}: ")):
        StateDir(path).prepare()


# -- lock ---------------------------------------------------------------------------------


def test_a_second_daemon_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "state")
    first.prepare()
    first.lock()
    try:
        assert (first.path / "voipd.lock").read_text() == str(os.getpid())
        second = StateDir(tmp_path / "state")
        expected = f"Another voipd (pid {os.getpid()}) is running on {first.path}."
        with pytest.raises(StateError, match=re.escape(expected)):
            second.lock()
    finally:
        first.unlock()
    # Once the first daemon is gone the directory can be used again.
    second.lock()
    second.unlock()


def test_lock_rewrites_a_stale_pid(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    (state.path / "voipd.lock").write_text("999999999")
    state.lock()
    try:
        assert (state.path / "voipd.lock").read_text() == str(os.getpid())
    finally:
        state.unlock()


# -- config -------------------------------------------------------------------------------


def test_config_round_trip_keeps_the_ca_key(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    assert state.load_config() == {}
    ca = IdentityKey.generate().public_key
    state.save_config("127.0.0.1:7000", ca)
    config = state.load_config()
    assert config["login_server"] == "127.0.0.1:7000"
    assert StateDir.config_ca_key(config) == ca
    assert mode_of(state.path / "config.json") == 0o600


def test_config_without_a_ca_key_gives_none(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    (state.path / "config.json").write_text(json.dumps({"login_server": "h:1"}))
    assert StateDir.config_ca_key(state.load_config()) is None


def test_a_damaged_config_file_is_reported(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    path = state.path / "config.json"
    path.write_text('{"login_server": ')
    with pytest.raises(StateError, match=re.escape(f"Cannot read {path}: ")):
        state.load_config()


def test_a_damaged_saved_ca_key_is_reported() -> None:
    with pytest.raises(TrustAnchorError, match=r"The saved CA key is damaged \(bad base64\)\."):
        StateDir.config_ca_key({"ca": "voip-ca-ed25519 !!!notbase64"})


# -- session ------------------------------------------------------------------------------


def test_session_round_trip(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    assert state.load_session() is None
    session = a_session()
    state.save_session(session)
    assert mode_of(state.session_path) == 0o600
    assert state.load_session() == session
    state.forget_session()
    assert not state.session_path.exists()
    assert state.load_session() is None
    state.forget_session()  # forgetting twice is harmless


def _damaged_sessions() -> list[bytes]:
    good = a_session()
    document = {
        "username": good.username,
        "file_key": good.file_key,
        "certificate": bytes(good.certificate),
    }
    encoded = cbor2.dumps(document, canonical=True)
    tampered_cert = bytearray(bytes(good.certificate))
    tampered_cert[3] ^= 0xFF
    return [
        b"",
        b"garbage that is not cbor \xff\xfe",
        encoded[: len(encoded) // 2],
        cbor2.dumps({"username": "alice", "file_key": b"k" * 32}),
        cbor2.dumps({**document, "certificate": b"not a certificate"}),
        cbor2.dumps({**document, "certificate": bytes(tampered_cert)}),
        cbor2.dumps({**document, "file_key": "text, not bytes"}),
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps("a string"),
        # A flipped type byte must not allocate a key of 2**62 bytes.
        cbor2.dumps({**document, "file_key": 2**62}),
        cbor2.dumps({**document, "username": 5}),
        # The session names a key file; it must stay inside keys/.
        cbor2.dumps({**document, "username": "../../elsewhere"}),
        # The certificate belongs to somebody else.
        cbor2.dumps({**document, "username": "bob"}),
    ]


@pytest.mark.parametrize("data", _damaged_sessions())
def test_a_damaged_session_file_loads_as_none(tmp_path: Path, data: bytes) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    state.session_path.write_bytes(data)
    assert state.load_session() is None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> StateDir:
    """One state directory that the property tests overwrite example after example."""
    return StateDir(tmp_path_factory.mktemp("state"))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_session_bytes_never_crash(scratch: StateDir, data: bytes) -> None:
    scratch.session_path.write_bytes(data)
    loaded = scratch.load_session()
    assert loaded is None or isinstance(loaded, SavedSession)


GOOD = a_session()
field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    username=field_values,
    file_key=field_values,
    keep_certificate=st.booleans(),
)
def test_only_a_well_typed_session_loads(
    scratch: StateDir,
    username: object,
    file_key: object,
    keep_certificate: bool,
) -> None:
    document = {
        "username": username,
        "file_key": file_key,
        "certificate": bytes(GOOD.certificate) if keep_certificate else username,
    }
    scratch.session_path.write_bytes(cbor2.dumps(document))
    loaded = scratch.load_session()
    if loaded is not None:
        assert (username, file_key, keep_certificate) == ("alice", loaded.file_key, True)
