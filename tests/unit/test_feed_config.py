"""Feed options: the example config's feed sections validate; bad values name the key; secrets stay masked."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from bridge import cli
from bridge.adapter import Registry
from bridge.config import load
from bridge.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "bridge.example.toml"


def feed_sections() -> str:
    """The example's commented feed sections, uncommented."""
    text = EXAMPLE.read_text()
    blocks = re.findall(r"(# \[\[inbound\]\]\n(?:# [^\n]*\n)+)", text)
    feeds = [b for b in blocks if re.search(r'type = "(oa_articles|tencent_im_oa|x_alerts)"', b)]
    assert len(feeds) == 3
    return "\n".join(re.sub(r"^# ?", "", b, flags=re.MULTILINE) for b in feeds)


def test_example_feed_sections_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("oa-articles-key", "tencent-im-secret-key", "wallawhats-api-key"):
        (tmp_path / name).write_text(f"test-{name}\n")
    p = tmp_path / "bridge.toml"
    p.write_text(feed_sections())
    cfg = load(p, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    opts = Registry.from_module().validate(cfg)
    assert opts["im-oa"].base_url == "https://adminapisgp.im.qcloud.com"
    assert opts["articles"].api_key.reveal() == "test-oa-articles-key"
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["--config", str(p), "check-config"]) == 0
    assert "test-oa-articles-key" not in out.getvalue() and "test-wallawhats" not in out.getvalue()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('type = "x_alerts"\napi_key = "k"\ninterval = 0', "inbound.f.interval: must be more than 0 seconds"),
        ('type = "x_alerts"\napi_key = "k"\nbase_url = "ftp://x"', "inbound.f.base_url: expected an http"),
        ('type = "x_alerts"', "inbound.f.api_key: required key is missing"),
        ('type = "oa_articles"\napi_key = "k"\nsince_format = "weeks"', "inbound.f.since_format"),
        ('type = "oa_articles"\napi_key = "k"\nbogus = 1', "inbound.f.bogus: unknown key"),
        (
            'type = "tencent_im_oa"\nsdkappid = 1\nsecret_key = "s"\nofficial_account = "@TOA#_a"\npage_size = 50',
            "inbound.f.page_size: must be between 1 and 20",
        ),
        (
            'type = "tencent_im_oa"\nsdkappid = 1\nsecret_key = "s"',
            "inbound.f.official_account: required key",
        ),
    ],
)
def test_bad_feed_options_name_the_key(tmp_path: Path, body: str, error: str) -> None:
    p = tmp_path / "bridge.toml"
    p.write_text(f'[[inbound]]\nname = "f"\n{body}\n')
    with pytest.raises(ConfigError) as e:
        Registry.from_module().validate(load(p, env={}))
    assert error in str(e.value)
    assert '"k"' not in str(e.value) and "secret_key = " not in str(e.value)
