import dataclasses

import pytest

from tunnel_telemetry.config import (
    OPTIONS,
    Config,
    ConfigError,
    describe,
    load_config,
)


def test_defaults():
    config = load_config(env={}, path="")
    assert config.listen == "0.0.0.0:8080"
    assert config.database_url == "sqlite:///tt-data/reports.db"
    assert config.proxy_hops == 0 and config.proxy_header == "X-Forwarded-For"
    assert config.max_report_age == 7 * 86400 and config.max_clock_skew == 300
    assert config.ooni_relay is False and config.relay_url == ()


def test_precedence_flag_env_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("collector-id: from-file\nproxy_hops: 1\nhostname: file.example\n")
    env = {"COLLECTOR_ID": "from-env", "PROXY_HOPS": "2"}
    config = load_config(flags={"collector-id": "from-flag"}, env=env, path=str(path))
    assert config.collector_id == "from-flag"
    assert config.proxy_hops == 2
    assert config.hostname == "file.example"


def test_seed_readme_env_and_yaml(tmp_path):
    config = load_config(env={"AUTOTLS": "true", "HOSTNAME": "collector.example.org"}, path="")
    assert config.autotls and config.hostname == "collector.example.org"
    assert config.listen == "0.0.0.0:443"
    path = tmp_path / "config.yaml"
    path.write_text("autotls: true\nhostname: collector.asdf.network\n")
    config = load_config(env={}, path=str(path))
    assert config.autotls and config.hostname == "collector.asdf.network"


def test_config_env_var_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("collector-id: abc\n")
    assert load_config(env={"TT_CONFIG": str(path)}).collector_id == "abc"


@pytest.mark.parametrize("env, listen", [
    ({"PORT": "5000"}, "0.0.0.0:5000"),
    ({"PORT": "5000", "LISTEN": "127.0.0.1:9000"}, "127.0.0.1:9000"),
    ({"LISTEN": ":9000"}, "0.0.0.0:9000"),
    ({"LISTEN": "[::1]:9000"}, "[::1]:9000"),
])
def test_listen(env, listen):
    assert load_config(env=env, path="").listen == listen


@pytest.mark.parametrize("env, message", [
    ({"PROXY_HOPS": "two"}, "proxy-hops"),
    ({"PROXY_HOPS": "-1"}, "proxy-hops"),
    ({"ALLOW_PUBLIC_ENDPOINT": "maybe"}, "allow-public-endpoint"),
    ({"MAX_REPORT_AGE": "7 weeks"}, "max-report-age"),
    ({"LISTEN": "nowhere"}, "listen"),
    ({"LISTEN": ":70000"}, "listen"),
    ({"AUTOTLS": "1"}, "hostname"),
    ({"CERTFILE": "/x.pem"}, "keyfile"),
    ({"RELAY_URL": "ftp://x"}, "http"),
    ({"PROXY_HEADER": "X Bad"}, "proxy-header"),
    ({"COLLECTOR_ID": "has space"}, "collector-id"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "lang,sni"}, "'sni' names a secret"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "PassWord"}, "'password' names a secret"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "shortid"}, "'shortid' names a secret"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "localIp"}, "'localip' names a secret"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "serviceName"}, "'servicename' names a secret"),
    ({"SCRUB_ALLOW_CONFIG_KEYS": "a b"}, "scrub-allow-config-keys"),
])
def test_bad_values(env, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(env=env, path="")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("nonsense: 1\n", "unknown option 'nonsense'"),
    ("- a\n- b\n", "mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, path=str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={}, path="/nonexistent/config.yaml")


def test_lists_from_env_flags_and_yaml(tmp_path):
    token = {"RELAY_TOKEN": "a-long-enough-token"}
    assert load_config(env={"RELAY_URL": "http://a, http://b", **token}, path="").relay_url == (
        "http://a", "http://b")
    assert load_config(flags={"relay-url": ("http://c",)}, env=token).relay_url == ("http://c",)
    path = tmp_path / "c.yaml"
    path.write_text("relay-tokens:\n  - t1-0123456789abcdef\n  - t2-0123456789abcdef\n")
    assert load_config(env={}, path=str(path)).relay_tokens == (
        "t1-0123456789abcdef", "t2-0123456789abcdef")


def test_durations():
    config = load_config(env={"MAX_REPORT_AGE": "2d", "MAX_CLOCK_SKEW": "90"}, path="")
    assert config.max_report_age == 172800 and config.max_clock_skew == 90


def test_from_mapping_and_describe_masks_secrets():
    config = Config.from_mapping({"relay-token": "s3cret-s3cret-s3cret",
                                  "database-url": "sqlite:///x.db"})
    shown = describe(config)
    assert shown["relay-token"] == "***"
    assert "s3cret" not in repr(shown)


def test_every_option_has_help():
    assert all(opt.help for opt in OPTIONS)


@pytest.mark.parametrize("options, message", [
    ({"relay-url": ("http://b",)}, "relay-token: required"),
    ({"relay-tokens": ("short",)}, "16-512 printable"),
    ({"relay-token": "has a space in it!"}, "16-512 printable"),
    ({"relay-attempt-timeout": "0"}, "relay-attempt-timeout"),
    ({"relay-timeout": "1h"}, "relay-timeout"),
    ({"relay-interval": "0"}, "relay-interval"),
    ({"relay-retry-min": "2h", "relay-retry-max": "1h"}, "relay-retry-min"),
    ({"relay-max-age": "0"}, "relay-max-age"),
    ({"relay-batch": "101"}, "relay-batch"),
    ({"relay-concurrency": "0"}, "relay-concurrency"),
    ({"relay-concurrency": "257"}, "relay-concurrency"),
    ({"relay-url": ("https://user:pw@b.example",), "relay-token": "a-long-enough-token"},
     "no credentials"),
    ({"ooni-api": "https://k@api.example"}, "no credentials"),
])
def test_bad_relay_options(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags=options, env={}, path="")


@pytest.mark.parametrize("name", ["database-url", "ooni-api", "geo-provider",
                                  "autotls-cache-dir", "acme-directory", "rate-limit-storage"])
def test_option_with_default_must_not_be_empty(name):
    with pytest.raises(ConfigError, match=f"^{name}: must not be empty$"):
        load_config(flags={name: ""}, env={}, path="")


def test_config_fields_are_the_option_table():
    config = load_config(env={}, path="")
    assert [f.name for f in dataclasses.fields(config)] == [opt.attr for opt in OPTIONS]
    assert config.replace(debug=True).debug is True


def test_relay_option_defaults():
    c = load_config(env={}, path="")
    assert (c.relay_timeout, c.relay_attempt_timeout, c.relay_max_age) == (5, 30, 7 * 86400)
    assert (c.relay_retry_min, c.relay_retry_max, c.relay_interval, c.relay_batch) == (
        30, 6 * 3600, 10, 50)


@pytest.mark.parametrize("env, expected", [
    ({"TT_COLLECTOR_ID": "prefixed"}, "prefixed"),
    ({"COLLECTOR_ID": "bare"}, "bare"),
    ({"TT_COLLECTOR_ID": "prefixed", "COLLECTOR_ID": "bare"}, "prefixed"),
])
def test_tt_prefixed_env_wins_over_bare(env, expected):
    assert load_config(env=env).collector_id == expected


def test_tt_hostname_wins_over_dockers_hostname():
    env = {"AUTOTLS": "true", "HOSTNAME": "3f2a9c1b7d4e", "TT_HOSTNAME": "collector.example.org"}
    assert load_config(env=env).hostname == "collector.example.org"


def test_bare_config_variable_is_not_a_config_file():
    # CONFIG is too common a name (other tools set it): only TT_CONFIG names the file.
    assert load_config(env={"CONFIG": "nope.yaml"}).collector_id is None


def test_scrub_allow_config_keys_are_compared_as_scrub_does():
    config = load_config(env={"SCRUB_ALLOW_CONFIG_KEYS": "Service_Mode, lang"}, path="")
    assert config.scrub_allow_config_keys == ("service-mode", "lang")
