"""CHARX cards: a zip with `card.json` at its root and asset files under `assets/...`.

Reading checks every member name (no `..`, no absolute path), the member count, the declared
total size and each member's compression ratio before reading anything, and reads only into
memory. Assets are reached through `embeded://path` (or `embedded://path`) URIs. Writing packs
`card.json` plus the given files, with fixed timestamps so the same card gives the same bytes.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Mapping

from talkloop.characters.cards.card_file import CardFile, CardFormat, CardVersion, embedded_path
from talkloop.characters.cards.json_card import decode_card_json, encode_card_json
from talkloop.characters.cards.limits import CardLimits
from talkloop.characters.cards.versions import card_from_character, character_from_card
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import CardAsset, Character

CARD_MEMBER = "card.json"
MAIN_ICON_PATH = "assets/icon/images/main.png"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member_name(name: str, source: str | None) -> None:
    """Refuse an archive path that is absolute or climbs out of the archive."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise CardFormatError(
            f"archive member {name!r} has an absolute path; paths must be relative",
            source=source,
        )
    if ".." in parts:
        raise CardFormatError(
            f"archive member {name!r} escapes the archive with '..'; paths must stay inside it",
            source=source,
        )


def read_charx_card(raw: bytes, source: str | None, limits: CardLimits) -> CardFile:
    """A CHARX card; its members other than `card.json` come back in `files`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CardFormatError(f"not a valid CHARX (zip) file: {exc}", source=source) from None
    with archive:
        members = _checked_members(archive, limits, source)
        files = {info.filename: _read_member(archive, info, source) for info in members}
    if CARD_MEMBER not in files:
        raise CardFormatError(
            f"CHARX has no {CARD_MEMBER} at the root of the archive", source=source
        )
    where = f"{source or 'CHARX'} {CARD_MEMBER}"
    card = decode_card_json(files.pop(CARD_MEMBER), where, limits)
    character, version = character_from_card(card, where)
    icon = character.avatar_asset
    path = embedded_path(icon.uri) if icon is not None and icon.ext == "png" else None
    image = files.get(path) if path is not None else None
    return CardFile(character, CardFormat.CHARX, version, image=image, files=files)


def _checked_members(
    archive: zipfile.ZipFile, limits: CardLimits, source: str | None
) -> list[zipfile.ZipInfo]:
    """The file members, once names, count, sizes, ratios and encryption all pass."""
    infos = archive.infolist()
    if len(infos) > limits.max_archive_members:
        raise CardFormatError(
            f"CHARX has {len(infos)} members, over the limit of {limits.max_archive_members} "
            "(CardLimits.max_archive_members)",
            source=source,
        )
    names: set[str] = set()
    for info in infos:
        _check_member(info, names, limits, source)
    total = sum(info.file_size for info in infos)
    if total > limits.max_unpacked_bytes:
        raise CardFormatError(
            f"CHARX unpacks to {total} bytes, over the {limits.max_unpacked_bytes}-byte "
            "limit (CardLimits.max_unpacked_bytes)",
            source=source,
        )
    return [info for info in infos if not info.is_dir()]


def _check_member(
    info: zipfile.ZipInfo, names: set[str], limits: CardLimits, source: str | None
) -> None:
    check_member_name(info.filename, source)
    if info.filename in names:
        raise CardFormatError(f"archive member {info.filename!r} appears twice", source=source)
    names.add(info.filename)
    if info.flag_bits & 0x1:
        raise CardFormatError(
            f"archive member {info.filename!r} is encrypted; CHARX must not be", source=source
        )
    limits.check_ratio(info.file_size, info.compress_size, f"{source or 'CHARX'} {info.filename}")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str | None) -> bytes:
    # NOTE: zipfile stops at the declared file_size and checks the CRC, so checked sizes hold.
    try:
        with archive.open(info) as member:
            return member.read()
    except (zipfile.BadZipFile, zlib.error, OSError, NotImplementedError, EOFError) as exc:
        raise CardFormatError(
            f"archive member {info.filename!r} cannot be read: {exc}", source=source
        ) from None


def write_charx_card(
    character: Character,
    version: CardVersion,
    files: Mapping[str, bytes],
    image: bytes | None,
) -> bytes:
    """Pack `character` and `files`; `image` becomes the main icon if that is `ccdefault:`."""
    character, files = _pack_image(character, dict(files), image)
    _check_files(character, files)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        card = encode_card_json(card_from_character(character, version), indent=2)
        archive.writestr(_member(CARD_MEMBER), card)
        for path in sorted(files):
            archive.writestr(_member(path), files[path])
    return out.getvalue()


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _pack_image(
    character: Character, files: dict[str, bytes], image: bytes | None
) -> tuple[Character, dict[str, bytes]]:
    icon = character.avatar_asset
    if image is None or icon is None or icon.uri != "ccdefault:":
        return character, files
    files[MAIN_ICON_PATH] = image
    packed = CardAsset(type="icon", uri=f"embeded://{MAIN_ICON_PATH}", name=icon.name, ext="png")
    return character.with_asset(packed), files


def _check_files(character: Character, files: Mapping[str, bytes]) -> None:
    for path in files:
        check_member_name(path, "files")
        if path == CARD_MEMBER:
            raise CardFormatError(
                f"files must not contain {CARD_MEMBER}; it is written from the character"
            )
    for asset in character.assets or []:
        wanted = embedded_path(asset.uri)
        if wanted is not None and wanted not in files:
            raise CardFormatError(
                f"asset {asset.name!r} points at {asset.uri!r}, but files has no {wanted!r}; "
                "pass its bytes in files",
                field="data.assets",
            )
