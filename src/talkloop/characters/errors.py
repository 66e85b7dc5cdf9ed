"""Character error hierarchy: every failure `talkloop.characters` raises on purpose.

Each module adds its own subclasses of `CharacterError`; messages name the thing that is
wrong (a file, a field path such as `data.alternate_greetings[2]`) and what would be right.
"""


class CharacterError(Exception):
    """Base class of every error the characters package raises on purpose."""


class CardFormatError(CharacterError, ValueError):
    """A character card file or object cannot be read or written as given.

    `field` is the JSON path of the offending value (e.g. `data.character_book.entries[0].keys`)
    and `source` the file, archive member or chunk it came from, when known.
    """

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        where = ", ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.field = field
        self.source = source
