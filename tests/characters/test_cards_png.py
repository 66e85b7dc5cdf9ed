"""PNG cards: `chara` / `ccv3` chunks, exact round trips, pixels kept, tEXt/zTXt/iTXt read."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from talkloop.characters.cards import CardFormat, CardVersion, load_card, read_card, save_card
from talkloop.characters.cards.png import split_chunks
from talkloop.characters.model import CardAsset


def v3_card() -> dict[str, Any]:
    entry = {
        "keys": ["k"],
        "content": "c",
        "extensions": {"x": {"y": 1}},
        "enabled": True,
        "insertion_order": 1,
        "use_regex": False,
        "id": "e1",
        "entry_extra": [1],
    }
    data = {
        "name": "Pix",
        "description": "d",
        "personality": "p",
        "scenario": "s",
        "first_mes": "hi",
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": ["hey"],
        "tags": ["t"],
        "creator": "c",
        "character_version": "1",
        "extensions": {"vendor": {"z": True}, "talkloop": {"voice": {"engine": "flite"}}},
        "character_book": {"extensions": {}, "entries": [entry], "book_extra": 2},
        "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        "nickname": "P",
        "group_only_greetings": [],
        "creation_date": 0,
        "data_extra": "kept",
    }
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data, "top_extra": 5}


def v2_card() -> dict[str, Any]:
    card = json.loads(save_card(load_card(json.dumps(v3_card()).encode()), "json", 2))
    assert isinstance(card, dict)
    return card


def picture(mode: str = "RGBA", size: tuple[int, int] = (5, 3), fmt: str = "PNG") -> bytes:
    image = Image.new(mode, size)
    image.putdata([(x * 40, x * 7 % 256, 200, 255)[: len(mode)] for x in range(size[0] * size[1])])
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_with_text(texts: list[tuple[str, str, str]]) -> bytes:
    """A PNG whose text chunks Pillow writes: (kind: text|ztext|itxt|itxt-zip, key, value)."""
    info = PngImagePlugin.PngInfo()
    for kind, key, value in texts:
        if kind == "text":
            info.add_text(key, value)
        elif kind == "ztext":
            info.add_text(key, value, zip=True)
        else:
            info.add_itxt(key, value, zip=kind == "itxt-zip")
    out = io.BytesIO()
    Image.open(io.BytesIO(picture())).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def b64(card: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode()


def card_chunks(png: bytes) -> dict[str, dict[str, Any]]:
    found = {}
    for chunk in split_chunks(png, None):
        if chunk.type == b"tEXt":
            key, _, text = chunk.data.partition(b"\0")
            found[key.decode()] = json.loads(base64.b64decode(text))
    return found


def pixels(png: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(png)) as image:
        return image.mode, image.size, image.tobytes()


def test_v3_png_holds_both_chunks_and_round_trips_exactly() -> None:
    character = load_card(json.dumps(v3_card()).encode())
    png = save_card(character, CardFormat.PNG, CardVersion.V3, image=picture())
    chunks = card_chunks(png)
    assert chunks["ccv3"] == v3_card()
    assert chunks["chara"] == v2_card()
    card = read_card(png)
    assert (card.format, card.version) == (CardFormat.PNG, CardVersion.V3)
    assert json.loads(save_card(card.character, "json", 3)) == v3_card()
    assert save_card(card.character, "png", 3, image=card.image) == png


def test_writing_keeps_every_image_chunk_and_the_pixels() -> None:
    image = picture()
    png = save_card(load_card(json.dumps(v3_card()).encode()), "png", 3, image=image)
    kept = [chunk for chunk in split_chunks(png, None) if chunk.type != b"tEXt"]
    assert kept == split_chunks(image, None)
    assert pixels(png) == pixels(image)
    assert read_card(png).image == image


def test_resaving_replaces_the_card_chunks() -> None:
    png = save_card(load_card(json.dumps(v3_card()).encode()), "png", 3, image=picture())
    renamed = read_card(png).character.with_changes(name="Renamed")
    again = save_card(renamed, "png", 3, image=png)
    texts = [c for c in split_chunks(again, None) if c.type == b"tEXt"]
    assert len(texts) == 2
    assert load_card(again).name == "Renamed"


def test_ccv3_is_read_before_chara() -> None:
    v3 = v3_card()
    stale = v2_card()
    stale["data"]["name"] = "Stale"
    png = png_with_text([("text", "chara", b64(stale)), ("text", "ccv3", b64(v3))])
    assert load_card(png).name == "Pix"


def test_chara_only_v2_png_round_trips() -> None:
    png = png_with_text([("text", "chara", b64(v2_card()))])
    card = read_card(png)
    assert card.version is CardVersion.V2
    written = save_card(card.character, "png", 2, image=card.image)
    assert card_chunks(written) == {"chara": v2_card()}


def test_v1_card_in_chara() -> None:
    v1 = {
        "name": "Old",
        "description": "",
        "personality": "",
        "scenario": "",
        "first_mes": "hello",
        "mes_example": "",
        "chat": "Old - 2023",
    }
    card = read_card(png_with_text([("text", "chara", b64(v1))]))
    assert card.version is CardVersion.V1
    assert card_chunks(save_card(card.character, "png", 1, image=card.image)) == {"chara": v1}


@pytest.mark.parametrize("kind", ["ztext", "itxt", "itxt-zip"])
def test_compressed_and_international_text_chunks_are_read(kind: str) -> None:
    png = png_with_text([(kind, "ccv3", b64(v3_card()))])
    assert json.loads(save_card(load_card(png), "json", 3)) == v3_card()


def test_base64_with_line_breaks_and_no_padding_is_read() -> None:
    text = b64(v3_card()).rstrip("=")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert load_card(png_with_text([("text", "ccv3", wrapped)])).name == "Pix"


def test_png_without_an_image_gets_a_valid_placeholder(tmp_path: Path) -> None:
    png = save_card(load_card(json.dumps(v3_card()).encode()), "png", 3)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (1, 1)
    path = tmp_path / "pix.png"
    path.write_bytes(png)
    assert json.loads(save_card(load_card(path), "json", 3)) == v3_card()


def test_a_jpeg_image_is_converted_to_png() -> None:
    jpeg = picture(mode="RGB", fmt="JPEG")
    png = save_card(load_card(json.dumps(v3_card()).encode()), "png", 3, image=jpeg)
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.size) == ("PNG", (5, 3))
    assert load_card(png).name == "Pix"


def test_v2_png_writes_only_chara() -> None:
    png = save_card(load_card(json.dumps(v3_card()).encode()), "png", 2, image=picture())
    assert card_chunks(png) == {"chara": v2_card()}
    assert json.loads(save_card(load_card(png), "json", 3)) == v3_card()


def test_legacy_asset_chunks_resolve_as_asset_uris() -> None:
    card = v3_card()
    card["data"]["assets"].append(
        {"type": "emotion", "uri": "__asset:happy.png", "name": "happy", "ext": "png"}
    )
    smile = picture(size=(2, 2))
    png = png_with_text(
        [
            ("text", "ccv3", b64(card)),
            ("text", "chara-ext-asset_:happy.png", base64.b64encode(smile).decode()),
        ]
    )
    loaded = read_card(png)
    assert loaded.asset_bytes(loaded.character.expression_assets["happy"]) == smile
    avatar = loaded.character.avatar_asset
    assert avatar is not None and loaded.asset_bytes(avatar) == loaded.image
    resaved = save_card(loaded.character, "png", 3, image=loaded.image)
    assert read_card(resaved).files == {"happy.png": smile}


def test_data_url_assets_resolve() -> None:
    loaded = read_card(png_with_text([("text", "ccv3", b64(v3_card()))]))
    uri = "data:image/png;base64," + base64.b64encode(b"abc").decode()
    assert loaded.asset_bytes(CardAsset(type="x_other", uri=uri, name="a", ext="png")) == b"abc"
    assert loaded.asset_bytes(CardAsset(type="x_other", uri="https://x/a.png")) is None


def test_hand_built_png_chunk_layout() -> None:
    """A card written by another tool with the stdlib: IHDR, tEXt chara, IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"chara\0" + b64(v2_card()).encode())
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )
    card = read_card(png)
    assert pixels(card.image or b"") == ("RGB", (1, 1), b"\xff\x00\x00")
    assert json.loads(save_card(card.character, "json", 2)) == v2_card()
