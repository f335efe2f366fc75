from __future__ import annotations

from pathlib import Path

import pytest

from adapters import SINKS, SOURCES
from bridge.adapter import Registry
from bridge.config import Secret, load, parse_rates
from bridge.errors import ConfigError
from bridge.redact import masked

BASE = """
[[inbound]]
name = "corp"
type = "manual"
reply_via = "out"
[[outbound]]
name = "out"
type = "log"
rate = "20/minute"
[[routes]]
from = "corp"
to = ["out", {sink = "out", conversation = "wr1"}]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "b.toml"
    p.write_text(text)
    return p


def err(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        cfg = load(write(tmp_path, text), env=env or {})
        Registry(SOURCES, SINKS).validate(cfg)  # type: ignore[arg-type]
    return str(e.value)


def test_valid_config_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE), env={})
    assert cfg.inbound[0].reply_via == "out"
    assert cfg.routes[0].to[1].conversation == "wr1"
    assert cfg.routes[0].sources == ["corp"]
    assert cfg.bridge.instance  # defaults to the hostname
    assert cfg.data_dir == (tmp_path / "var").resolve()
    assert cfg.listen == ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[bridge]\nlog_levl = 'x'\n", "bridge.log_levl: unknown key"),
        ("[http]\nlisten = 'nope'\n", "http.listen: expected host:port"),
        ("[http]\nmax_body = 'big'\n", "http.max_body: Expected `int`, got `str`"),
        ("[redis]\nurl = 'http://x'\n", "redis.url: expected redis://"),
        ("[nope]\n", "nope: unknown section"),
        ("[[inbound]]\ntype = 'manual'\n", "inbound[0].name: required"),
        ("[[inbound]]\nname = 'a'\n", "inbound.a.type: required key is missing"),
        ("[[outbound]]\nname = 'o'\ntype = 'log'\nrate = '20 per minute'\n", "outbound.o.rate:"),
        (
            "[[outbound]]\nname = 'o'\ntype = 'log'\nconcurrency = 0\n",
            "outbound.o.concurrency: must be at least 1",
        ),
        (
            "[[inbound]]\nname = 'a'\ntype = 'manual'\nreply_via = 'x'\n",
            "inbound.a.reply_via: no outbound named 'x'",
        ),
        ("[[inbound]]\nname = 'a'\ntype = 'nosuch'\n", "inbound.a.type: unknown inbound type 'nosuch'"),
        ("[[outbound]]\nname = 'o'\ntype = 'log'\nbogus = 1\n", "outbound.o.bogus: unknown key"),
        ("[[outbound]]\nname = 'o'\ntype = 'http'\n", "outbound.o.url: required key is missing"),
        ("[[outbound]]\nname = 'o'\ntype = 'http'\nurl = 'ftp://x'\n", "outbound.o.url: expected an http"),
        (BASE + "[[routes]]\nfrom = 'ghost'\nto = 'out'\n", "routes[1].from: no inbound"),
        (BASE + "[[routes]]\nfrom = 'corp'\nto = 'ghost'\n", "routes[1].to[0]: no outbound named 'ghost'"),
        (
            BASE + "[[routes]]\nfrom = 'corp'\nto = 'out'\nmatch = {text = '('}\n",
            "routes[1].match.text: not a valid",
        ),
        (
            BASE + "[[routes]]\nfrom = 'corp'\nto = 'out'\nmatch = {nope = 1}\n",
            "routes[1].match.nope: unknown key",
        ),
        (BASE + "[[routes]]\nfrom = 'corp'\nto = 'out'\nwhen = 1\n", "routes[1].when: unknown key"),
        (
            "[[outbound]]\nname = 'o'\ntype = 'log'\n[[outbound]]\nname = 'o'\ntype = 'log'\n",
            "outbound.o: the name is used twice",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    msg = err(tmp_path, text)
    assert expected in msg
    assert str(tmp_path / "b.toml") in msg


def test_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in err(tmp_path, "[bridge\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_env_interpolation(tmp_path: Path) -> None:
    text = "[http]\nlisten = '${HOST}:${PORT:-9000}'\n"
    cfg = load(write(tmp_path, text), env={"HOST": "0.0.0.0"})
    assert cfg.http.listen == "0.0.0.0:9000"
    assert "http.listen: environment variable ${HOST} is not set" in err(tmp_path, text, env={})


def test_secret_from_file_and_masked(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("s3cret-value\n")
    text = f"[[outbound]]\nname = 'o'\ntype = 'http'\nurl = 'http://x'\nsecret_file = '{tmp_path / 's'}'\n"
    cfg = load(write(tmp_path, text), env={})
    opts = Registry(SOURCES, SINKS).validate(cfg)["o"]  # type: ignore[arg-type]
    assert isinstance(opts.secret, Secret)
    assert opts.secret.reveal() == "s3cret-value"
    assert "s3cret" not in repr(opts) and "s3cret" not in str(opts.secret)
    assert masked({"secret": "x", "corp_secret": "y", "name": "n"}) == {
        "secret": "***",
        "corp_secret": "***",
        "name": "n",
    }
    assert masked("redis://user:pw@host:6379/0") == "redis://***@host:6379/0"


def test_secret_file_errors(tmp_path: Path) -> None:
    missing = "[[outbound]]\nname = 'o'\ntype = 'http'\nurl = 'http://x'\nsecret_file = '/nonexistent/s'\n"
    assert "outbound.o.secret_file: cannot read /nonexistent/s" in err(tmp_path, missing)
    both = "[[outbound]]\nname = 'o'\ntype = 'http'\nurl = 'http://x'\nsecret = 'a'\nsecret_file = '/x'\n"
    assert "outbound.o.secret_file: give either secret or secret_file" in err(tmp_path, both)


def test_placeholder_refused_without_showing_it(tmp_path: Path) -> None:
    text = "[[outbound]]\nname = 'o'\ntype = 'http'\nurl = 'http://x'\nsecret = 'CHANGE_ME'\n"
    msg = err(tmp_path, text)
    assert "outbound.o.secret: still holds a placeholder" in msg


def test_rates() -> None:
    assert [(r.count, r.period) for r in parse_rates("30/minute, 1000/hour")] == [(30, 60), (1000, 3600)]
    assert [(r.count, r.period) for r in parse_rates("5/10s")] == [(5, 10)]
    assert parse_rates("none") == []
    with pytest.raises(ValueError):
        parse_rates("5/fortnight")


def test_example_configs_are_valid(tmp_path: Path) -> None:
    """Every shipped config validates, adapters' options included, with stand-in credential files."""
    import re

    root = Path(__file__).parents[2] / "config"
    for p in sorted(root.glob("*.toml")):
        for name in re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", p.read_text()):
            (tmp_path / name).write_text("A" * 43 if "aes" in name else f"test-{name}")
        cfg = load(p, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
        Registry.from_module().validate(cfg)
