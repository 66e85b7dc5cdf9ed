"""Bad card files: each gets a CardFormatError that names the problem, and nothing changes."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from talkloop.characters.cards import CardFormat, CardLimits, load_card, read_card
from talkloop.characters.errors import CardFormatError

CARD: dict[str, Any] = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {"name": "Bad", "alternate_greetings": ["a", "b"], "extensions": {}},
}


def picture(fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(out, format=fmt)
    return out.getvalue()


def png_with(key: str, value: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    out = io.BytesIO()
    Image.open(io.BytesIO(picture())).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def b64(card: Any) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode()


def charx(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def refused(tmp_path: Path, name: str, raw: bytes, limits: CardLimits | None = None) -> str:
    """Load `raw` from a file; check it fails and that the folder is exactly as before."""
    path = tmp_path / name
    path.write_bytes(raw)
    os.utime(path, (1_000_000, 1_000_000))
    before = sorted(tmp_path.parent.rglob("*"))
    with pytest.raises(CardFormatError) as caught:
        load_card(path, limits=limits)
    assert sorted(tmp_path.parent.rglob("*")) == before
    assert path.read_bytes() == raw
    assert path.stat().st_mtime == 1_000_000
    assert str(caught.value).startswith(f"{path}")
    return str(caught.value)


def test_not_a_png(tmp_path: Path) -> None:
    message = refused(tmp_path, "card.png", picture("JPEG"))
    assert "not a PNG file: it starts with b'\\xff\\xd8" in message
    with pytest.raises(CardFormatError, match="not a PNG file"):
        read_card(json.dumps(CARD).encode(), format=CardFormat.PNG)


def test_png_without_a_card_chunk(tmp_path: Path) -> None:
    message = refused(tmp_path, "plain.png", png_with("Comment", "just a picture"))
    assert message.endswith("PNG has no character card: no `ccv3` or `chara` text chunk")


def test_bad_base64(tmp_path: Path) -> None:
    message = refused(tmp_path, "b.png", png_with("chara", "not*base64!"))
    assert message == (
        f"{tmp_path / 'b.png'} `chara` chunk: chunk text is not valid base64 "
        "(expected base64-encoded UTF-8 JSON)"
    )


def test_bad_json_in_a_chunk(tmp_path: Path) -> None:
    garbage = base64.b64encode(b'{"spec": "chara_card_v2", "data": {').decode()
    message = refused(tmp_path, "j.png", png_with("ccv3", garbage))
    assert message.startswith(f"{tmp_path / 'j.png'} `ccv3` chunk: bad JSON: ")
    assert "line 1 column 36" in message


def test_bad_json_file(tmp_path: Path) -> None:
    message = refused(tmp_path, "card.json", b'{"name": "x",, }')
    assert message.endswith(
        "bad JSON: Expecting property name enclosed in double quotes at line 1 column 14"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"name": "\xff"}', "card JSON is not valid UTF-8 (bad byte at offset 10)"),
        (b'{"name": NaN}', "bad JSON: NaN is not valid JSON; numbers must be finite"),
        (b'{"spec": "lorebook_v3", "data": {}}', "spec: unknown card spec 'lorebook_v3'"),
        (b'{"avatar": "x"}', "not a character card: the object has no `spec`, `data` or `name`"),
        (b'{"spec": "chara_card_v2", "data": []}', "data: expected an object, got list"),
        (b"[1, 2]", "not a character card: it starts with b'[1, 2]'"),
        (b"\x00\x01binary", "not a character card: it starts with"),
    ],
)
def test_bad_json_content(tmp_path: Path, raw: bytes, reason: str) -> None:
    assert reason in refused(tmp_path, "card.json", raw)


@pytest.mark.parametrize(("depth", "reason"), [(100_000, "bad JSON"), (500, "nests deeper")])
def test_json_nested_too_deeply(tmp_path: Path, depth: int, reason: str) -> None:
    deep = b'{"name": ' + b"[" * depth + b"]" * depth + b"}"
    assert reason in refused(tmp_path, "deep.json", deep)


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        ({"alternate_greetings": ["a", "b", 3]}, "data.alternate_greetings[2]", "a string"),
        ({"name": ["x"]}, "data.name", "a string"),
        (
            {"character_book": {"entries": [{"keys": "k"}]}},
            "data.character_book.entries[0].keys",
            "a list",
        ),
        ({"extensions": "none"}, "data.extensions", "an object"),
    ],
)
def test_field_of_the_wrong_type(
    tmp_path: Path, data: dict[str, Any], field: str, expected: str
) -> None:
    card = {**CARD, "data": {**CARD["data"], **data}}
    message = refused(tmp_path, "card.png", png_with("chara", b64(card)))
    assert f"`chara` chunk, {field}: expected {expected}, got " in message


def test_wrong_type_in_a_v1_card(tmp_path: Path) -> None:
    message = refused(tmp_path, "v1.json", b'{"name": "x", "first_mes": 5}')
    assert message.endswith("first_mes: expected a string, got int 5")


def test_truncated_png_and_bad_crc(tmp_path: Path) -> None:
    png = png_with("chara", b64(CARD))
    assert "truncated PNG" in refused(tmp_path, "t.png", png[:-20])
    broken = bytearray(png)
    broken[20] ^= 0xFF  # inside IHDR's data
    assert "chunk b'IHDR' at byte 8 fails its CRC check" in refused(
        tmp_path, "c.png", bytes(broken)
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "archive member '../evil.txt' escapes the archive with '..'"),
        ("assets/../../evil.txt", "escapes the archive"),
        ("assets\\..\\..\\evil.txt", "escapes the archive"),
        ("/etc/evil.txt", "archive member '/etc/evil.txt' has an absolute path"),
        ("C:/evil.txt", "has an absolute path"),
    ],
)
def test_charx_paths_that_escape(tmp_path: Path, name: str, reason: str) -> None:
    raw = charx({"card.json": json.dumps(CARD).encode(), name: b"pwned"})
    assert reason in refused(tmp_path, "card.charx", raw)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_charx_zip_bomb_by_ratio(tmp_path: Path) -> None:
    raw = charx({"card.json": json.dumps(CARD).encode(), "assets/x.bin": bytes(8 * 1024 * 1024)})
    message = refused(tmp_path, "bomb.charx", raw)
    assert "assets/x.bin: compression ratio" in message
    assert "is over the limit of 100:1 (a zip bomb?)" in message


def test_charx_over_the_unpacked_size_limit(tmp_path: Path) -> None:
    raw = charx({"card.json": json.dumps(CARD).encode(), "assets/a.bin": os.urandom(5000)})
    limits = CardLimits(max_unpacked_bytes=4096)
    message = refused(tmp_path, "big.charx", raw, limits)
    assert "over the 4096-byte limit (CardLimits.max_unpacked_bytes)" in message


def test_charx_with_too_many_members(tmp_path: Path) -> None:
    raw = charx({f"assets/{i}.txt": b"x" for i in range(5)} | {"card.json": b"{}"})
    message = refused(tmp_path, "many.charx", raw, CardLimits(max_archive_members=4))
    assert "CHARX has 6 members, over the limit of 4" in message


def test_charx_without_card_json_or_not_a_zip(tmp_path: Path) -> None:
    assert "CHARX has no card.json" in refused(tmp_path, "a.charx", charx({"x.json": b"{}"}))
    assert "not a valid CHARX (zip) file" in refused(tmp_path, "b.charx", b"PK\x03\x04junk")
    assert "not a CHARX file" in refused(tmp_path, "c.charx", b"{}")


def test_charx_with_a_corrupt_member(tmp_path: Path) -> None:
    raw = bytearray(charx({"card.json": json.dumps(CARD).encode()}))
    header_size = 30 + len("card.json")
    raw[header_size + 2] ^= 0xFF  # flip a byte of the deflated data
    assert "archive member 'card.json' cannot be read" in refused(tmp_path, "x.charx", bytes(raw))


def test_charx_with_a_bad_card_json_names_the_member(tmp_path: Path) -> None:
    message = refused(tmp_path, "j.charx", charx({"card.json": b"{nope"}))
    assert message.startswith(f"{tmp_path / 'j.charx'} card.json: bad JSON")


def test_file_over_the_size_limit(tmp_path: Path) -> None:
    raw = png_with("chara", b64(CARD))
    limits = CardLimits(max_file_bytes=100)
    message = refused(tmp_path, "big.png", raw, limits)
    assert message == (
        f"{tmp_path / 'big.png'}: file is {len(raw)} bytes, over the 100-byte limit "
        "(CardLimits.max_file_bytes)"
    )
    with pytest.raises(CardFormatError, match="over the 100-byte limit"):
        load_card(raw, limits=limits)


def test_card_json_over_the_json_limit(tmp_path: Path) -> None:
    message = refused(
        tmp_path, "j.png", png_with("chara", b64(CARD)), CardLimits(max_json_bytes=50)
    )
    assert "card JSON is over the 50-byte limit (CardLimits.max_json_bytes)" in message


def test_compressed_text_chunk_bomb(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("ccv3", "A" * (4 * 1024 * 1024), zip=True)
    out = io.BytesIO()
    Image.open(io.BytesIO(picture())).save(out, format="PNG", pnginfo=info)
    assert "(a zip bomb?)" in refused(tmp_path, "z.png", out.getvalue())


def test_png_chunk_length_past_the_end(tmp_path: Path) -> None:
    png = picture()
    lying = png[:8] + struct.pack(">I", 10**9) + png[12:]
    assert "needs 1000000000 bytes" in refused(tmp_path, "l.png", lying)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_file_bytes": 0}, {"max_compression_ratio": 0.5}, {"max_archive_members": 0}],
)
def test_limits_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="CardLimits"):
        CardLimits(**kwargs)
