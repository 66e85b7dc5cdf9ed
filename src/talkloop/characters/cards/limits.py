"""Size limits every card reader enforces before it trusts a file (one frozen config).

Readers check a file's size before parsing it, a CHARX's declared sizes and compression ratio
before reading any member, and the size of any decompressed text; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

from talkloop.characters.errors import CardFormatError

MIB = 1024 * 1024


@dataclass(frozen=True)
class CardLimits:
    """How large a card may be; any reader raises `CardFormatError` past a limit.

    `max_compression_ratio` applies to each CHARX member (and zTXt/iTXt chunk) of at least
    `ratio_floor_bytes` uncompressed: small files compress well without being bombs.
    """

    max_file_bytes: int = 64 * MIB
    max_json_bytes: int = 16 * MIB
    max_unpacked_bytes: int = 256 * MIB
    max_compression_ratio: float = 100.0
    ratio_floor_bytes: int = 1 * MIB
    max_archive_members: int = 4096
    max_json_depth: int = 100

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_json_bytes", "max_unpacked_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CardLimits.{name} must be a positive byte count")
        if self.max_compression_ratio < 1:
            raise ValueError("CardLimits.max_compression_ratio must be at least 1")
        if self.ratio_floor_bytes < 0 or self.max_archive_members <= 0:
            raise ValueError(
                "CardLimits.ratio_floor_bytes must be >= 0 and max_archive_members > 0"
            )
        if self.max_json_depth < 8:
            raise ValueError("CardLimits.max_json_depth must be at least 8 (cards nest ~5 deep)")

    def check_file_size(self, num_bytes: int, source: str | None) -> None:
        """Refuse a whole card file over `max_file_bytes`."""
        if num_bytes > self.max_file_bytes:
            raise CardFormatError(
                f"file is {num_bytes} bytes, over the {self.max_file_bytes}-byte limit "
                "(CardLimits.max_file_bytes)",
                source=source,
            )

    def check_json_size(self, num_bytes: int, source: str | None) -> None:
        """Refuse card JSON (plain or decoded from a chunk) over `max_json_bytes`."""
        if num_bytes > self.max_json_bytes:
            raise CardFormatError(
                f"card JSON is over the {self.max_json_bytes}-byte limit "
                "(CardLimits.max_json_bytes)",
                source=source,
            )

    def check_json_depth(self, value: object, source: str | None) -> None:
        """Refuse JSON nested deeper than `max_json_depth` (copying it would overflow)."""
        stack: list[tuple[object, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > self.max_json_depth:
                raise CardFormatError(
                    f"card JSON nests deeper than {self.max_json_depth} levels "
                    "(CardLimits.max_json_depth)",
                    source=source,
                )
            if isinstance(node, dict):
                stack.extend((child, depth + 1) for child in node.values())
            elif isinstance(node, list):
                stack.extend((child, depth + 1) for child in node)

    def check_ratio(self, unpacked_bytes: int, packed_bytes: int, source: str | None) -> None:
        """Refuse a compressed stream that expands more than `max_compression_ratio` times."""
        if unpacked_bytes < self.ratio_floor_bytes:
            return
        ratio = unpacked_bytes / max(packed_bytes, 1)
        if ratio > self.max_compression_ratio:
            raise CardFormatError(
                f"compression ratio {ratio:.0f}:1 is over the limit of "
                f"{self.max_compression_ratio:.0f}:1 (a zip bomb?); "
                "CardLimits.max_compression_ratio",
                source=source,
            )
