"""autotls: cache files, renewal policy, TLS context reloading; ACME against a real pebble."""

import datetime
import json
import os
import socket
import ssl
import stat
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from gunicorn.config import Config as GunicornConfig
from gunicorn.sock import ssl_context as gunicorn_ssl_context

from tunnel_telemetry.cli import main
from tunnel_telemetry.config import Config, ConfigError, check_hostname, load_config
from tunnel_telemetry.files import write_private
from tunnel_telemetry.testing.pebble import Pebble, pebble_missing, write_listener_cert
from tunnel_telemetry.testing.server import free_port, wait_for
from tunnel_telemetry.tls import autotls
from tunnel_telemetry.tls.autotls import (
    ACMESettings,
    AutoTLS,
    AutoTLSError,
    CertCache,
    ReloadingSSLContext,
    Renewer,
    TLSConfigError,
    check_cert_pair,
    ensure_private_dir,
    retry_delays,
)

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
DIRECTORY = "https://acme.example/dir"

needs_pebble = pytest.mark.skipif(
    pebble_missing() is not None and not os.environ.get("TT_REQUIRE_PEBBLE"),
    reason=f"ACME tests need Debian's pebble: {pebble_missing()}",
)


def make_cert(hostname, not_before=NOW - DAY, not_after=NOW + 60 * DAY, key=None):
    """A self-signed certificate for `hostname`: (key PEM, cert PEM)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("Collector.Example.org", "collector.example.org"),
    ("collector.example.org.", "collector.example.org"),
    ("localhost", "localhost"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("*.example.org", ValueError),
    ("192.0.2.1", ValueError),
    ("2001:db8::1", ValueError),
    ("-bad.example", ValueError),
    ("under_score.example", ValueError),
    ("a" * 64 + ".example", ValueError),
    ("", ValueError),
])
def test_check_hostname(name, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            check_hostname(name)
    else:
        assert check_hostname(name) == expected


def test_autotls_defaults():
    config = Config.from_mapping({"autotls": True, "hostname": "Collector.Example.org"})
    assert config.listen == "0.0.0.0:443"
    assert config.hostname == "collector.example.org"
    assert config.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert (config.renew_before_days, config.acme_http_port) == (30, 80)
    assert config.autotls_check_interval == 12 * 3600
    assert config.acme_ca_bundle is None and config.acme_email is None


def test_autotls_options_from_environment(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    config = load_config(env={
        "AUTOTLS": "true", "HOSTNAME": "collector.example.org", "RENEW_BEFORE_DAYS": "20",
        "ACME_HTTP_PORT": "8080", "ACME_CA_BUNDLE": str(bundle), "AUTOTLS_CHECK_INTERVAL": "1h",
        "ACME_EMAIL": "ops@example.org", "AUTOTLS_CACHE_DIR": str(tmp_path / "c"),
    }, path="")
    assert (config.renew_before_days, config.acme_http_port) == (20, 8080)
    assert config.autotls_check_interval == 3600 and config.acme_email == "ops@example.org"


@pytest.mark.parametrize("options, message", [
    ({"autotls": True}, "hostname is required"),
    ({"autotls": True, "hostname": "*.example.org"}, "hostname: wildcard"),
    ({"autotls": True, "hostname": "192.0.2.7"}, "hostname: not a DNS host name"),
    ({"autotls": True, "hostname": "a.example", "renew-before-days": 0}, "renew-before-days"),
    ({"autotls": True, "hostname": "a.example", "acme-http-port": 70000}, "acme-http-port"),
    ({"autotls": True, "hostname": "a.example", "acme-ca-bundle": "/nonexistent/ca.pem"},
     "acme-ca-bundle: no such file"),
    ({"autotls": True, "hostname": "a.example", "acme-directory": "ftp://x"}, "acme-directory"),
    ({"autotls": True, "hostname": "a.example", "autotls-check-interval": "0s"},
     "autotls-check-interval"),
    ({"autotls": True, "hostname": "a.example", "certfile": __file__, "keyfile": __file__},
     "either --autotls or --certfile"),
    ({"certfile": "/nonexistent/c.pem", "keyfile": __file__}, "certfile: no such file"),
])
def test_bad_autotls_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping(options)


def test_hostname_from_environment_ignored_without_autotls():
    # Containers export HOSTNAME; it must not break a plain HTTP collector.
    config = load_config(env={"HOSTNAME": "build_box_1"}, path="")
    assert not config.autotls


@pytest.mark.parametrize("env", [{"AUTOTLS": "true", "HOSTNAME": ""}, {"AUTOTLS": "1"}])
def test_cli_autotls_without_hostname_exits_2(runner, env):
    result = runner.invoke(main, [], env={"HOSTNAME": "", **env, "TT_CONFIG": ""})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line]
    assert lines == ["tt-server: error: autotls: --hostname is required with --autotls"]


def test_container_hostname_is_not_a_certificate_name(runner):
    # Docker exports HOSTNAME=<container id>; Let's Encrypt cannot certify a bare label.
    result = runner.invoke(main, [], env={"AUTOTLS": "true", "HOSTNAME": "3f2a9c1e7b4d",
                                          "TT_CONFIG": ""})
    assert result.exit_code == 2
    assert "hostname: '3f2a9c1e7b4d' is not a fully qualified" in result.output


def test_cli_bad_certfile_pair_exits_2(runner, tmp_path):
    key_pem, cert_pem = make_cert("localhost")
    other_key, _ = make_cert("localhost")
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(other_key)
    result = runner.invoke(main, ["--certfile", str(tmp_path / "c.pem"), "--keyfile",
                                  str(tmp_path / "k.pem"), "--database-url",
                                  f"sqlite:///{tmp_path}/r.db"], env={"TT_CONFIG": ""})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and "certfile: cannot load" in lines[0]


def test_check_cert_pair(tmp_path):
    key_pem, cert_pem = make_cert("localhost")
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    check_cert_pair(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    (tmp_path / "k.pem").write_bytes(make_cert("localhost")[0])
    with pytest.raises(TLSConfigError, match="KEY_VALUES_MISMATCH"):
        check_cert_pair(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


def test_cli_renew_needs_autotls(runner):
    result = runner.invoke(main, ["renew"], env={"TT_CONFIG": ""})
    assert result.exit_code == 2 and "autotls is off" in result.output


# --- the cache -----------------------------------------------------------------------------


def test_private_dir_created_0700_and_tightened(tmp_path):
    path = tmp_path / "a" / "cache"
    ensure_private_dir(path)
    assert mode(path) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert mode(loose) == 0o700


def test_cache_roundtrip(tmp_path):
    cache = CertCache(tmp_path / "cache", "collector.example.org")
    cache.prepare()
    key_pem, cert_pem = make_cert("collector.example.org")
    saved = cache.save(key_pem, cert_pem, DIRECTORY)
    loaded = cache.load(DIRECTORY)
    assert loaded == saved and loaded.directory == DIRECTORY
    assert mode(cache.cert_path) == 0o600 and mode(cache.meta_path) == 0o600
    assert mode(tmp_path / "cache") == 0o700
    # One file: chain then key, loadable by ssl as gunicorn does (keyfile=None).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cache.cert_path)


def _bad_key(hostname):
    key_pem, _ = make_cert(hostname)
    _, cert_pem = make_cert(hostname)
    return key_pem, cert_pem


@pytest.mark.parametrize("make, directory, why", [
    (lambda: make_cert("other.example.org"), DIRECTORY, "not for collector.example.org"),
    (lambda: _bad_key("collector.example.org"), DIRECTORY, "does not match"),
    (lambda: make_cert("collector.example.org", NOW - 10 * DAY, NOW - DAY), DIRECTORY,
     "expired"),
    (lambda: make_cert("collector.example.org"), "https://other.example/dir", "came from"),
])
def test_cache_rejects_unusable_certificates(tmp_path, caplog, make, directory, why):
    cache = CertCache(tmp_path, "collector.example.org")
    key_pem, cert_pem = make()
    cache.cert_path.write_bytes(cert_pem + key_pem)
    cache.meta_path.write_text(json.dumps({"directory": DIRECTORY}))
    with caplog.at_level("WARNING", "tunnel_telemetry.tls.autotls"):
        assert cache.load(directory) is None
    assert why in caplog.text


def test_cache_garbage_and_missing(tmp_path, caplog):
    cache = CertCache(tmp_path, "collector.example.org")
    assert cache.load(DIRECTORY) is None
    cache.cert_path.write_bytes(b"not a pem")
    assert cache.load(DIRECTORY) is None
    assert "no PEM certificate" in caplog.text


def test_account_key_created_once(tmp_path):
    cache = CertCache(tmp_path / "c", "a.example")
    cache.prepare()
    first = cache.account_key()
    assert mode(cache.account_key_path) == 0o600
    assert cache.account_key().thumbprint() == first.thumbprint()


# --- renewal policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("lifetime_days, remaining_days, renew_before, due", [
    (90, 31, 30, False),
    (90, 29.9, 30, True),
    (90, 59, 60, True),
    (45, 16, 30, True),   # shorter than renew-before... 30 < 45: still 30
    (6, 2.1, 30, False),  # 30 >= 6-day lifetime: renew at a third (2 days)
    (6, 1.9, 30, True),
])
def test_due(lifetime_days, remaining_days, renew_before, due):
    cert = autotls.Certificate(
        path=None, hostname="x", serial=1, directory=None, sha256="",
        not_before=NOW - (lifetime_days - remaining_days) * DAY,
        not_after=NOW + remaining_days * DAY,
    )
    assert cert.due(renew_before, NOW) is due


@pytest.mark.parametrize("interval, expected", [
    (12 * 3600, [300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 43200, 43200]),
    (4, [1, 2, 4, 4, 4]),
])
def test_retry_delays_back_off(interval, expected):
    delays = retry_delays(interval)
    got = [next(delays) for _ in expected]
    for value, want in zip(got, expected, strict=True):
        assert want * 0.8 <= value <= want


# --- workers' SSL context ----------------------------------------------------------------------


def served_serial(server_context, cafile):
    """Handshake in memory against `server_context`; the serial the client was shown."""
    client_context = ssl.create_default_context(cafile=cafile)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    return x509.load_der_x509_certificate(client.getpeercert(binary_form=True)).serial_number


def test_reloading_ssl_context_follows_replaced_files(tmp_path, caplog):
    ca, cert, key = write_listener_cert(tmp_path)
    first = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    conf = GunicornConfig()
    conf.set("certfile", str(cert))
    conf.set("keyfile", str(key))
    conf.set("ssl_context", ReloadingSSLContext())  # gunicorn validates the hook's arity
    context = gunicorn_ssl_context(conf)
    assert gunicorn_ssl_context(conf) is context  # one context per file version
    assert served_serial(context, ca) == first

    # A new pair signed by another CA: written key first, so for a moment they mismatch.
    other = tmp_path / "other"
    other.mkdir()
    ca2, cert2, key2 = write_listener_cert(other)
    second = x509.load_pem_x509_certificate(cert2.read_bytes()).serial_number
    write_private(key, key2.read_bytes())
    with caplog.at_level("WARNING", "tunnel_telemetry.tls.autotls"):
        assert gunicorn_ssl_context(conf) is context  # mismatch: keep serving the old one
    assert "serving the previous certificate" in caplog.text
    write_private(cert, cert2.read_bytes())
    assert served_serial(context, ca2) == second  # a worker's one context follows the files
    renewed = gunicorn_ssl_context(conf)
    assert renewed is not context and served_serial(renewed, ca2) == second


def test_reloading_ssl_context_fails_when_nothing_loads(tmp_path):
    conf = GunicornConfig()
    (tmp_path / "c.pem").write_text("nope")
    conf.set("certfile", str(tmp_path / "c.pem"))
    conf.set("ssl_context", ReloadingSSLContext())
    with pytest.raises(ssl.SSLError):
        gunicorn_ssl_context(conf)


# --- ACME against pebble ---------------------------------------------------------------------


@pytest.fixture
def pebble(tmp_path):
    with Pebble(tmp_path / "pebble") as server:
        yield server


def settings(pebble, **changes):
    values = {"directory": pebble.directory, "ca_bundle": str(pebble.ca_bundle),
              "http_host": "127.0.0.1", "http_port": pebble.http_port}
    return ACMESettings(**{**values, **changes})


def verify_chain(cert_path, root_pem, hostname):
    """Check the served chain really chains to pebble's root for `hostname`."""
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    store = verification.Store(x509.load_pem_x509_certificates(root_pem))
    verifier = (verification.PolicyBuilder().store(store)
                .build_server_verifier(x509.DNSName(hostname)))
    verifier.verify(chain[0], chain[1:])


@needs_pebble
def test_obtain_then_reuse_without_acme(pebble, tmp_path):
    tls = AutoTLS("localhost", tmp_path / "cache", settings(pebble))
    cert = tls.ensure()
    verify_chain(cert.path, pebble.root_pem, "localhost")
    assert f"validate w/ HTTP: http://localhost:{pebble.http_port}/" in pebble.log()
    assert mode(tmp_path / "cache") == 0o700
    for name in ("account-key.pem", "localhost.pem", "localhost.json"):
        assert mode(tmp_path / "cache" / name) == 0o600
    log_before = pebble.log()
    pebble.pause()  # an ACME request now would hang: the cache must be enough
    try:
        again = AutoTLS("localhost", tmp_path / "cache", settings(pebble)).ensure()
    finally:
        pebble.resume()
    assert again.serial == cert.serial and again.sha256 == cert.sha256
    assert pebble.log() == log_before


@needs_pebble
def test_renew_only_when_due_new_key_each_time(pebble, tmp_path):
    shift = datetime.timedelta(0)
    tls = AutoTLS("localhost", tmp_path / "cache", settings(pebble),
                  clock=lambda: datetime.datetime.now(datetime.UTC) + shift)
    first = tls.ensure()  # pebble: 5-year certificates
    first_key = _key(first.path)
    assert tls.renew().serial == first.serial  # not due: no ACME request
    assert pebble.count("POST /order-plz") == 1
    shift = first.remaining() - 29 * DAY  # 29 days left
    assert tls.next_check(3600) == 0
    second = tls.renew()
    assert second.serial != first.serial and second.sha256 != first.sha256
    assert _key(second.path) != first_key  # a new private key with every certificate
    assert pebble.count("POST /order-plz") == 2
    forced = tls.renew(force=True)
    assert forced.serial != second.serial
    verify_chain(forced.path, pebble.root_pem, "localhost")


def _key(path):
    return path.read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[1]


@needs_pebble
def test_changed_directory_gets_new_certificate(pebble, tmp_path):
    first = AutoTLS("localhost", tmp_path, settings(pebble)).ensure()
    via_name = pebble.directory.replace("127.0.0.1", "localhost")
    second = AutoTLS("localhost", tmp_path, settings(pebble, directory=via_name)).ensure()
    assert second.serial != first.serial and second.directory == via_name


@needs_pebble
def test_challenge_failure_is_reported(pebble, tmp_path):
    tls = AutoTLS("localhost", tmp_path, settings(pebble, http_port=free_port()))
    with pytest.raises(AutoTLSError) as info:
        tls.ensure()
    assert info.value.reason == "challenge_failed"
    assert "could not validate localhost over HTTP-01" in str(info.value)
    assert "onnection refused" in str(info.value)
    assert not (tmp_path / "localhost.pem").exists()


@needs_pebble
def test_http01_port_busy(pebble, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", pebble.http_port))
        busy.listen()
        with pytest.raises(AutoTLSError) as info:
            AutoTLS("localhost", tmp_path, settings(pebble)).ensure()
    assert info.value.reason == "http01_port"
    assert f"cannot listen on 127.0.0.1:{pebble.http_port}" in str(info.value)


@needs_pebble
def test_untrusted_acme_server(pebble, tmp_path):
    with pytest.raises(AutoTLSError) as info:
        AutoTLS("localhost", tmp_path, settings(pebble, ca_bundle=None)).ensure()
    assert info.value.reason == "acme_unreachable"
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


def test_acme_server_down(tmp_path):
    acme = ACMESettings(directory=f"https://127.0.0.1:{free_port()}/dir", http_port=free_port())
    with pytest.raises(AutoTLSError) as info:
        AutoTLS("localhost", tmp_path, acme).ensure()
    assert info.value.reason == "acme_unreachable"
    assert "Connection refused" in str(info.value)


@needs_pebble
def test_renewer_check_renews_in_a_child_process(tmp_path):
    # 2-day certificates + 3 s: with renew-before-days 2 they are due 3 s after issuance.
    with Pebble(tmp_path / "pebble", validity=2 * 86400 + 3) as pebble:
        tls = AutoTLS("localhost", tmp_path / "cache", settings(pebble), renew_before_days=2)
        first = tls.ensure()
        renewer = Renewer(tls, check_interval=3600)
        assert wait_for(lambda: first.due(2))
        result = renewer.check()
        assert result["ok"], result
        renewed = tls.cache.load()
        assert renewed.serial != first.serial
        assert result["certificate"] == renewed.describe()
        assert 0 < result["next_check"] <= 3600
        assert pebble.count("POST /order-plz") == 2


def due_cached_cert(cache_dir, directory):
    """A cached certificate for localhost, valid for 10 more days: due with the defaults."""
    cache = CertCache(cache_dir, "localhost")
    cache.prepare()
    key_pem, cert_pem = make_cert("localhost", NOW - 80 * DAY, NOW + 10 * DAY)
    return cache.save(key_pem, cert_pem, directory)


def test_renewer_backs_off_and_keeps_the_certificate(tmp_path, caplog):
    acme = ACMESettings(directory=f"https://127.0.0.1:{free_port()}/dir", http_port=free_port())
    cert = due_cached_cert(tmp_path, acme.directory)
    before = cert.path.read_bytes()
    renewer = Renewer(AutoTLS("localhost", tmp_path, acme), check_interval=4)
    caplog.set_level("INFO", "tunnel_telemetry.tls.autotls")
    renewer.start()
    try:
        assert wait_for(lambda: renewer.failures >= 3, timeout=30)
    finally:
        renewer.stop()
    failures = [r.getMessage() for r in caplog.records if "renewal failed" in r.getMessage()]
    assert "[acme_unreachable] (attempt 1)" in failures[0]
    assert "Connection refused" in failures[0]
    assert "retrying in 1s" in failures[0] and "retrying in 2s" in failures[1]
    assert all(f"still serving {cert.describe()}" in f for f in failures)
    assert cert.path.read_bytes() == before


def test_renewer_stop_ends_thread_and_child(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        acme = ACMESettings(directory=f"https://127.0.0.1:{port}/dir", http_port=free_port())
        due_cached_cert(tmp_path, acme.directory)
        renewer = Renewer(AutoTLS("localhost", tmp_path, acme), check_interval=60)
        renewer.start()
        assert wait_for(lambda: renewer._child is not None, timeout=10)
        pid = renewer._child
        time.sleep(0.5)  # the child is now waiting for the silent server
        os.kill(pid, 0)  # still running
        renewer.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert not any(t.name == "autotls-renewer" for t in threading.enumerate())
