"""Credential store (uctr's auth.json and Docker's config.json) and auth header parsing."""

import base64
import json
import os
import pwd
import stat
import time
from email.utils import formatdate

import pytest

from uctr_batch.errors import ConfigError
from uctr_batch.image import auth
from uctr_batch.image.registry import _parse_challenge, _retry_after


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Every test gets its own HOME, Docker config dir and uctr config dir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("UCTR_CONFIG_DIR", str(tmp_path / "config" / "uctr"))
    return tmp_path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_docker_config(tmp_path, auths) -> None:
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": auths}))


@pytest.mark.parametrize("text,host", [
    ("docker.io", "docker.io"),
    ("index.docker.io", "docker.io"),
    ("registry-1.docker.io", "docker.io"),
    ("https://index.docker.io/v1/", "docker.io"),
    ("Registry.Example.org:5000", "registry.example.org:5000"),
    ("https://registry.example.org:5000", "registry.example.org:5000"),
    ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
    ("quay.io/some/path", "quay.io"),
])
def test_normalize_host(text, host):
    assert auth.normalize_host(text) == host


@pytest.mark.parametrize("key,lookup_as", [
    ("https://index.docker.io/v1/", "docker.io"),
    ("docker.io", "docker.io"),
    ("reg.example.org:5000", "reg.example.org:5000"),
    ("https://reg.example.org:5000", "reg.example.org:5000"),
    ("http://reg.example.org:5000/v2/", "reg.example.org:5000"),
])
def test_docker_config_key_forms(private_dirs, key, lookup_as):
    write_docker_config(private_dirs, {key: {"auth": b64("alice:s3cr:et")}})
    creds = auth.lookup(lookup_as)
    assert (creds.username, creds.password) == ("alice", "s3cr:et")
    assert creds.source == str(private_dirs / "docker" / "config.json")
    assert auth.lookup("other.example.org") is None


def test_docker_config_username_password_fields(private_dirs):
    write_docker_config(private_dirs, {"quay.io": {"username": "bob", "password": "pw"}})
    assert auth.lookup("quay.io") == auth.Credentials("bob", "pw")


def test_docker_config_default_location_is_home(private_dirs, monkeypatch):
    monkeypatch.delenv("DOCKER_CONFIG")
    docker_dir = private_dirs / "home" / ".docker"
    docker_dir.mkdir(parents=True)
    (docker_dir / "config.json").write_text(json.dumps({"auths": {"h.io": {"auth": b64("u:p")}}}))
    assert auth.lookup("h.io") == auth.Credentials("u", "p")


@pytest.mark.parametrize("entry", [
    {"auth": "!!not base64!!"},
    {"auth": b64("no-colon")},
    {"auth": b64(":password-without-user")},
    {"identitytoken": "abc"},
    "not an object",
    {"auth": 12345},  # was a TypeError traceback
    {"auth": ["x"]},
])
def test_unusable_docker_entries_are_ignored(private_dirs, entry):
    write_docker_config(private_dirs, {"h.io": entry})
    assert auth.lookup("h.io") is None


def test_broken_docker_config_is_ignored_with_a_warning(private_dirs, caplog):
    (private_dirs / "docker").mkdir()
    (private_dirs / "docker" / "config.json").write_text("{not json")
    assert auth.lookup("h.io") is None
    assert "not a JSON object" in caplog.text


def test_deeply_nested_docker_config_is_ignored_with_a_warning(private_dirs, caplog):
    """json.loads raised RecursionError (a traceback on every pull) before the depth bound."""
    (private_dirs / "docker").mkdir()
    (private_dirs / "docker" / "config.json").write_text('{"auths": ' + "[" * 50000 + "]" * 50000 + "}")
    assert auth.lookup("h.io") is None
    assert "not a JSON object" in caplog.text


def test_credentials_repr_hides_the_password():
    assert "hunter2" not in repr(auth.Credentials("u", "hunter2"))
    assert auth.Credentials("u", "p").basic_authorization() == "Basic " + b64("u:p")


def test_save_writes_a_private_file_atomically(private_dirs):
    path = auth.save("https://Reg.Example.org:5000/", auth.Credentials("alice", "pw"))
    assert path == private_dirs / "config" / "uctr" / "auth.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert json.loads(path.read_text()) == {"auths": {"reg.example.org:5000": {"auth": b64("alice:pw")}}}
    auth.save("other.io", auth.Credentials("bob", "pw2"))
    assert sorted(json.loads(path.read_text())["auths"]) == ["other.io", "reg.example.org:5000"]
    assert sorted(os.listdir(path.parent)) == ["auth.json"]  # no temp or lock file left behind


def test_uctr_file_wins_over_docker_config(private_dirs):
    write_docker_config(private_dirs, {"h.io": {"auth": b64("docker-user:a")}})
    assert auth.lookup("h.io").username == "docker-user"
    auth.save("h.io", auth.Credentials("uctr-user", "b"))
    assert auth.lookup("h.io") == auth.Credentials("uctr-user", "b")


def test_remove_forgets_only_that_registry(private_dirs):
    auth.save("a.io", auth.Credentials("u", "p"))
    auth.save("b.io", auth.Credentials("v", "q"))
    assert auth.remove("https://a.io") is True
    assert auth.lookup("a.io") is None
    assert auth.lookup("b.io") == auth.Credentials("v", "q")
    assert auth.remove("a.io") is False


def test_save_refuses_a_group_readable_file(private_dirs):
    path = auth.save("a.io", auth.Credentials("u", "p"))
    path.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        auth.save("a.io", auth.Credentials("u", "new"))
    assert info.value.message == f"credentials file is accessible to other users (mode 0640): {path}"
    assert info.value.hint == f"run: chmod 600 {path}"
    path.chmod(0o600)
    assert auth.lookup("a.io").password == "p"  # the refused save changed nothing


def test_lookup_warns_about_a_readable_file_but_uses_it(private_dirs, caplog):
    path = auth.save("a.io", auth.Credentials("u", "p"))
    assert auth.lookup("a.io") == auth.Credentials("u", "p")
    assert caplog.text == ""
    path.chmod(0o644)
    assert auth.lookup("a.io") == auth.Credentials("u", "p")
    assert (f"credentials file is accessible to other users (mode 0644): {path} "
            f"(run: chmod 600 {path})") in caplog.text


def test_save_refuses_a_world_readable_directory(private_dirs):
    directory = private_dirs / "config" / "uctr"
    directory.mkdir(parents=True, mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(ConfigError) as info:
        auth.save("a.io", auth.Credentials("u", "p"))
    assert info.value.message == f"credentials directory is accessible to other users (mode 0755): {directory}"
    assert info.value.hint == f"run: chmod 700 {directory}"
    assert not (directory / "auth.json").exists()


def test_save_refuses_a_symlinked_file(private_dirs):
    directory = private_dirs / "config" / "uctr"
    directory.mkdir(parents=True, mode=0o700)
    target = private_dirs / "elsewhere.json"
    target.write_text("{}")
    (directory / "auth.json").symlink_to(target)
    with pytest.raises(ConfigError, match="credentials file is not a regular file"):
        auth.save("a.io", auth.Credentials("u", "p"))
    assert target.read_text() == "{}"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a file owned by someone else")
def test_save_refuses_a_file_owned_by_another_user(private_dirs):
    path = auth.save("a.io", auth.Credentials("u", "p"))
    other = pwd.getpwnam("nobody").pw_uid
    os.chown(path, other, -1)
    with pytest.raises(ConfigError) as info:
        auth.save("a.io", auth.Credentials("u", "p2"))
    assert info.value.message == f"credentials file is owned by uid {other}, not by you: {path}"


# -- header parsing used by the registry client -------------------------------------------------

@pytest.mark.parametrize("header,parsed", [
    (('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
      'scope="repository:library/debian:pull"'),
     ("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                 "scope": "repository:library/debian:pull"})),
    ('Basic realm="uctr-test"', ("basic", {"realm": "uctr-test"})),
    ('bearer realm=http://h/token, service=svc', ("bearer", {"realm": "http://h/token", "service": "svc"})),
    ('Bearer realm="r",scope="repository:a:pull,push"', ("bearer", {"realm": "r", "scope": "repository:a:pull,push"})),
    ("Negotiate abc", None),
    ("", None),
])
def test_parse_challenge(header, parsed):
    assert _parse_challenge(header) == parsed


def test_retry_after_forms():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    in_two_seconds = _retry_after(formatdate(time.time() + 2, usegmt=True))
    assert 0.5 < in_two_seconds <= 2.0
    assert _retry_after(formatdate(time.time() - 100, usegmt=True)) == 0.0


@pytest.mark.parametrize("value", [
    "\u00b2",  # str.isdigit() is True, float() refuses it: was a ValueError traceback
    "-5", "+5", "5.5", "1e9", " ", "x" * 10000, "9" * 13,
    "Mon, 01 Jan 99999 00:00:00 GMT",  # year out of range
    "Mon, 32 Foo 2020 99:99:99 GMT",
])
def test_retry_after_garbage_is_ignored(value):
    assert _retry_after(value) is None


def test_retry_after_far_future_is_capped_by_the_client():
    from uctr_batch.image.registry import RETRY_AFTER_CAP, RegistryClient

    far = _retry_after(formatdate(time.time() + 10 ** 9, usegmt=True))
    assert far > RETRY_AFTER_CAP and RegistryClient._delay(0, far) == RETRY_AFTER_CAP
    assert RegistryClient._delay(0, _retry_after("999999999999")) == RETRY_AFTER_CAP


@pytest.mark.parametrize("header", [
    "Bearer " + "a=b," * 5000,  # longer than any real challenge: not parsed at all
    'Bearer realm="' + '\\"' * 3000,  # unterminated quoted string
])
def test_hostile_challenges_are_bounded(header):
    parsed = _parse_challenge(header)
    assert parsed is None or all(isinstance(v, str) for v in parsed[1].values())
