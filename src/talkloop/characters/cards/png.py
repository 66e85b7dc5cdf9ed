"""PNG cards: card JSON as base64 in `ccv3` (V3) and `chara` (V2/V1) text chunks.

Reading takes `ccv3` first, then `chara`, from tEXt, zTXt or iTXt chunks, plus any
`chara-ext-asset_:{path}` asset chunks. Writing keeps every other chunk of the image byte for
byte (so the pixels never change) and puts the card chunks before IEND: `chara` always, and
`ccv3` for V3. `chara` is the plain V2 downgrade (no "loaded as V2" notice is added to
`creator_notes`, as SillyTavern does not). Embedded asset files other than the image itself
need CHARX: PNG only keeps the legacy `chara-ext-asset_` chunks it already had.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from dataclasses import dataclass

from talkloop.characters.cards.card_file import CardFile, CardFormat, CardVersion
from talkloop.characters.cards.json_card import decode_card_json, encode_card_json
from talkloop.characters.cards.limits import CardLimits
from talkloop.characters.cards.versions import card_from_character, character_from_card
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import Character

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # read in this order
ASSET_KEYWORD_PREFIX = "chara-ext-asset_:"
TEXT_CHUNK_TYPES = (b"tEXt", b"zTXt", b"iTXt")


@dataclass(frozen=True)
class Chunk:
    """One PNG chunk: its 4-byte type and its data (length and CRC are derived)."""

    type: bytes
    data: bytes

    def encode(self) -> bytes:
        crc = zlib.crc32(self.type + self.data)
        return struct.pack(">I", len(self.data)) + self.type + self.data + struct.pack(">I", crc)

    @property
    def keyword(self) -> str | None:
        """The keyword of a text chunk (tEXt, zTXt, iTXt), else None."""
        if self.type not in TEXT_CHUNK_TYPES:
            return None
        return self.data.partition(b"\0")[0].decode("latin-1")

    @property
    def is_card(self) -> bool:
        keyword = self.keyword
        return keyword is not None and keyword.lower() in CARD_KEYWORDS


def split_chunks(png: bytes, source: str | None) -> list[Chunk]:
    """PNG bytes -> chunks from IHDR to IEND, checking structure and CRCs."""
    if not png.startswith(PNG_SIGNATURE):
        raise CardFormatError(
            f"not a PNG file: it starts with {png[:8]!r}, a PNG starts with {PNG_SIGNATURE!r}",
            source=source,
        )
    chunks: list[Chunk] = []
    offset = len(PNG_SIGNATURE)
    while not chunks or chunks[-1].type != b"IEND":
        chunk, offset = _read_chunk(png, offset, source)
        chunks.append(chunk)
    if chunks[0].type != b"IHDR":
        raise CardFormatError("broken PNG: the first chunk is not IHDR", source=source)
    return chunks


def _read_chunk(png: bytes, offset: int, source: str | None) -> tuple[Chunk, int]:
    if offset + 12 > len(png):
        raise CardFormatError(f"truncated PNG: no IEND chunk by byte {offset}", source=source)
    length, chunk_type = struct.unpack_from(">I4s", png, offset)
    end = offset + 12 + length
    if end > len(png):
        raise CardFormatError(
            f"truncated PNG: chunk {chunk_type!r} at byte {offset} needs {length} bytes",
            source=source,
        )
    data = png[offset + 8 : end - 4]
    (crc,) = struct.unpack_from(">I", png, end - 4)
    if crc != zlib.crc32(chunk_type + data):
        raise CardFormatError(
            f"broken PNG: chunk {chunk_type!r} at byte {offset} fails its CRC check",
            source=source,
        )
    return Chunk(chunk_type, data), end


def chunk_text(chunk: Chunk, limits: CardLimits, source: str | None) -> bytes:
    """The text bytes of a tEXt, zTXt or iTXt chunk, inflated if compressed."""
    _, _, rest = chunk.data.partition(b"\0")
    if chunk.type == b"tEXt":
        return rest
    if chunk.type == b"zTXt":
        return _inflate(rest[1:], limits, source)
    compressed = rest[:1] == b"\x01"
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return _inflate(text, limits, source) if compressed else text


def _inflate(data: bytes, limits: CardLimits, source: str | None) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, limits.max_json_bytes + 1)
    except zlib.error as exc:
        raise CardFormatError(f"compressed text chunk is corrupt: {exc}", source=source) from None
    limits.check_json_size(len(text), source)
    limits.check_ratio(len(text), len(data), source)
    if not inflater.eof:
        raise CardFormatError("compressed text chunk is truncated", source=source)
    return text


def decode_chunk_base64(text: bytes, source: str | None) -> bytes:
    """Base64 text (whitespace and missing padding tolerated) -> bytes; raw JSON passes."""
    stripped = text.strip()
    if stripped.startswith(b"{"):
        return stripped  # some old writers stored the JSON itself
    compact = b"".join(stripped.split())
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CardFormatError(
            "chunk text is not valid base64 (expected base64-encoded UTF-8 JSON)", source=source
        ) from None


def read_png_card(png: bytes, source: str | None, limits: CardLimits) -> CardFile:
    """A PNG card: the `ccv3` chunk if present, else `chara`; keeps the image and asset chunks."""
    chunks = split_chunks(png, source)
    texts: dict[str, Chunk] = {}
    for chunk in chunks:
        if chunk.keyword is not None:
            texts.setdefault(chunk.keyword.lower(), chunk)
    keyword = next((key for key in CARD_KEYWORDS if key in texts), None)
    if keyword is None:
        raise CardFormatError(
            "PNG has no character card: no `ccv3` or `chara` text chunk", source=source
        )
    where = f"{source or 'PNG'} `{keyword}` chunk"
    raw = decode_chunk_base64(chunk_text(texts[keyword], limits, where), where)
    character, version = character_from_card(decode_card_json(raw, where, limits), where)
    image = PNG_SIGNATURE + b"".join(chunk.encode() for chunk in chunks if not chunk.is_card)
    files = _asset_chunks(chunks, limits, source)
    return CardFile(character, CardFormat.PNG, version, image=image, files=files)


def _asset_chunks(chunks: list[Chunk], limits: CardLimits, source: str | None) -> dict[str, bytes]:
    """`chara-ext-asset_:{path}` chunks by path (reachable as `__asset:{path}` URIs)."""
    files: dict[str, bytes] = {}
    for chunk in chunks:
        keyword = chunk.keyword
        if keyword is not None and keyword.startswith(ASSET_KEYWORD_PREFIX):
            where = f"{source or 'PNG'} `{keyword}` chunk"
            text = chunk_text(chunk, limits, where)
            files[keyword[len(ASSET_KEYWORD_PREFIX) :]] = decode_chunk_base64(text, where)
    return files


def write_png_card(character: Character, version: CardVersion, image: bytes | None) -> bytes:
    """`character` in `image` (any format Pillow reads; a 1x1 placeholder when None)."""
    base = image if image is not None else placeholder_png()
    if not base.startswith(PNG_SIGNATURE):
        base = convert_to_png(base)
    chunks = [chunk for chunk in split_chunks(base, "image") if not chunk.is_card]
    cards = [text_chunk("chara", min(version, CardVersion.V2), character)]
    if version is CardVersion.V3:
        cards.append(text_chunk("ccv3", CardVersion.V3, character))
    chunks[-1:-1] = cards
    return PNG_SIGNATURE + b"".join(chunk.encode() for chunk in chunks)


def text_chunk(keyword: str, version: CardVersion, character: Character) -> Chunk:
    """A tEXt chunk holding the card as base64 of its UTF-8 JSON."""
    card_json = encode_card_json(card_from_character(character, CardVersion(version)))
    return Chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + base64.b64encode(card_json))


def placeholder_png() -> bytes:
    """A 1x1 transparent PNG, for cards saved as PNG without an image."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # width, height, 8-bit RGBA
    pixels = zlib.compress(b"\x00" + b"\x00" * 4)  # filter byte + one RGBA pixel
    chunks = [Chunk(b"IHDR", header), Chunk(b"IDAT", pixels), Chunk(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(chunk.encode() for chunk in chunks)


def convert_to_png(image: bytes) -> bytes:
    """Re-encode a JPEG, WebP, ... avatar as PNG with Pillow."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as picture:
            out = io.BytesIO()
            picture.save(out, format="PNG")
    except (UnidentifiedImageError, OSError) as exc:
        raise CardFormatError(
            f"the image is not a PNG and Pillow cannot read it ({exc}); pass PNG, JPEG or WebP"
        ) from None
    return out.getvalue()
