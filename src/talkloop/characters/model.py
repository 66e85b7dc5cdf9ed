"""The one internal character model that every card version (V1, V2, V3) maps onto.

`Character`, `Lorebook`, `LorebookEntry` and `CardAsset` are frozen pydantic models whose field
names are the spec's own, so a validation error path is the card's JSON path. Keys no spec
defines are kept verbatim in `unknown_fields` (and keys beside `data` in
`Character.card_fields`), so import then export is lossless. Reading and writing card files
lives in `characters.cards`; lorebook activation does not live here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from talkloop.characters.errors import CardFormatError

Number = int | float
"""A JSON number: ints stay ints and floats stay floats, so a round trip keeps the text."""

TALKLOOP_EXTENSION = "talkloop"
"""Key of talkloop's own namespace in `extensions` (voice, avatar, expressions, V3 stash)."""

DEFAULT_ICON = {"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}
"""V3: a card without `assets` behaves as if it had exactly this one asset."""

VOICE_ASSET_TYPE = "x_talkloop_voice"
"""Asset type of voice samples (V3 asks custom asset types to start with `x_`)."""

_UNION_TAGS = frozenset({"int", "float", "str", "bool"})  # pydantic names union members in loc
_MESSAGES = {
    "string_type": "expected a string",
    "list_type": "expected a list",
    "int_type": "expected a number",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "missing": "is required",
}


def json_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    """`("alternate_greetings", 2)` under `data` -> `data.alternate_greetings[2]`."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path = f"{path}.{part}" if path else part
    return path


def card_format_error(exc: ValidationError, prefix: str, source: str | None) -> CardFormatError:
    """Turn pydantic's error into one that names the first bad field and the right type."""
    errors = exc.errors()
    field = json_path(prefix, errors[0]["loc"])
    same_field = [error for error in errors if json_path(prefix, error["loc"]) == field]
    wanted = dict.fromkeys(_MESSAGES.get(error["type"], error["msg"]) for error in same_field)
    message = " or ".join(wanted).replace(" or expected", " or")
    if errors[0]["type"] != "missing":
        given = errors[0]["input"]
        message += f", got {type(given).__name__} {_preview(given)}"
    return CardFormatError(message, field=field, source=source)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _to_json(value: Any) -> Any:
    if isinstance(value, SpecModel):
        return value.to_spec()
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return copy.deepcopy(value)


class SpecModel(BaseModel):
    """A spec JSON object: frozen, strictly typed, unknown keys kept in `unknown_fields`.

    Optional spec fields (default None) are written only when set or given, so an absent key
    stays absent and an explicit `null` stays `null`; required fields are always written.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    unknown_fields: dict[str, Any] = Field(default_factory=dict)

    NOT_SPEC: ClassVar[frozenset[str]] = frozenset({"unknown_fields"})
    NESTED: ClassVar[Mapping[str, type[SpecModel]]] = {}
    NESTED_LISTS: ClassVar[Mapping[str, type[SpecModel]]] = {}

    @classmethod
    def spec_field_names(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in cls.NOT_SPEC]

    @classmethod
    def shape(cls, raw: Any) -> Any:
        """Split a spec JSON object into model input: spec keys plus `unknown_fields`.

        NOTE: `null` in a required field reads as absent (its empty default), as SillyTavern
        does; anything that is not an object is passed through for validation to reject.
        """
        if not isinstance(raw, dict):
            return raw
        names = cls.spec_field_names()
        shaped = {k: v for k, v in raw.items() if k in names and not cls._null_required(k, v)}
        for name, model in cls.NESTED.items():
            if name in shaped:
                shaped[name] = model.shape(shaped[name])
        for name, model in cls.NESTED_LISTS.items():
            if isinstance(shaped.get(name), list):
                shaped[name] = [model.shape(item) for item in shaped[name]]
        shaped["unknown_fields"] = {k: v for k, v in raw.items() if k not in names}
        return shaped

    @classmethod
    def _null_required(cls, name: str, value: Any) -> bool:
        return value is None and cls.model_fields[name].default is not None

    @classmethod
    def from_spec(cls, raw: Any, *, path: str = "", source: str | None = None) -> Self:
        """Validate spec JSON; a bad value raises `CardFormatError` naming its JSON path."""
        try:
            return cls.model_validate(cls.shape(raw))
        except ValidationError as exc:
            raise card_format_error(exc, path, source) from None

    def to_spec(self) -> dict[str, Any]:
        """This object as spec JSON: its spec fields, then the unknown keys as they came."""
        out: dict[str, Any] = {}
        for name in self.spec_field_names():
            value = getattr(self, name)
            if value is not None or name in self.model_fields_set:
                out[name] = _to_json(value)
        for key, value in self.unknown_fields.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with `changes` applied (the model itself is frozen)."""
        given = {name: getattr(self, name) for name in self.model_fields_set}
        return self.model_validate({**given, **changes})


class SelectiveLogic(IntEnum):
    """How `secondary_keys` combine with `keys` (SillyTavern's `extensions.selectiveLogic`)."""

    AND_ANY = 0
    NOT_ALL = 1
    NOT_ANY = 2
    AND_ALL = 3


class CardAsset(SpecModel):
    """V3 asset: `uri` is `embeded://path`, `ccdefault:`, an https or data URL."""

    type: str = ""
    uri: str = ""
    name: str = ""
    ext: str = ""


class LorebookEntry(SpecModel):
    """One character_book entry with every V2 and V3 field (V3 adds `use_regex`)."""

    keys: list[str] = Field(default_factory=list)
    content: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: Number = 0
    case_sensitive: bool | None = None
    use_regex: bool | None = None
    constant: bool | None = None
    name: str | None = None
    priority: Number | None = None
    id: int | str | None = None
    comment: str | None = None
    selective: bool | None = None
    secondary_keys: list[str] | None = None
    position: str | None = None
    """Spec values are `before_char` and `after_char`; other strings are kept as found."""

    @property
    def selective_logic(self) -> SelectiveLogic:
        """SillyTavern's logic from `extensions.selectiveLogic`; AND_ANY when absent or odd."""
        raw = self.extensions.get("selectiveLogic", self.extensions.get("selective_logic", 0))
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 3:
            return SelectiveLogic(raw)
        return SelectiveLogic.AND_ANY


class Lorebook(SpecModel):
    """A character book (lorebook) as data; scanning and insertion live elsewhere."""

    NESTED_LISTS: ClassVar[Mapping[str, type[SpecModel]]] = {"entries": LorebookEntry}

    name: str | None = None
    description: str | None = None
    scan_depth: Number | None = None
    token_budget: Number | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = Field(default_factory=dict)
    entries: list[LorebookEntry] = Field(default_factory=list)


class Character(SpecModel):
    """A character, whatever card version it came from (the fields of `data` in V2/V3).

    `card_fields` holds the keys beside `data` that no spec defines (e.g. SillyTavern's V1
    mirror `name`, `avatar`, `create_date`), or for a V1 card its keys beyond the six V1 fields.
    `V3_ONLY` names the fields a V2 card cannot hold (see `cards.versions` for the downgrade).
    """

    NOT_SPEC: ClassVar[frozenset[str]] = frozenset(
        {"unknown_fields", "card_fields", "v2_inline_fields"}
    )
    V3_ONLY: ClassVar[tuple[str, ...]] = (
        "assets",
        "nickname",
        "creator_notes_multilingual",
        "source",
        "group_only_greetings",
        "creation_date",
        "modification_date",
    )
    NESTED: ClassVar[Mapping[str, type[SpecModel]]] = {"character_book": Lorebook}
    NESTED_LISTS: ClassVar[Mapping[str, type[SpecModel]]] = {"assets": CardAsset}

    # V1 and V2
    name: str = ""
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = Field(default_factory=list)
    character_book: Lorebook | None = None
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    # V3
    assets: list[CardAsset] | None = None
    nickname: str | None = None
    creator_notes_multilingual: dict[str, str] | None = None
    source: list[str] | None = None
    group_only_greetings: list[str] = Field(default_factory=list)
    creation_date: Number | None = None
    modification_date: Number | None = None
    # not spec fields: how the card file carried them
    card_fields: dict[str, Any] = Field(default_factory=dict)
    v2_inline_fields: tuple[str, ...] = ()
    """V3 fields a V2 card carried inline in `data` (as SillyTavern writes them); a V2
    export writes these back inline rather than in the `talkloop.v3` extension."""

    @property
    def greetings(self) -> list[str]:
        """`first_mes` then `alternate_greetings`: the greetings a 1:1 chat may open with."""
        return [self.first_mes, *self.alternate_greetings]

    @property
    def talkloop(self) -> dict[str, Any]:
        """A copy of `extensions["talkloop"]` ({} when absent or not an object)."""
        namespace = self.extensions.get(TALKLOOP_EXTENSION)
        return copy.deepcopy(namespace) if isinstance(namespace, dict) else {}

    def with_talkloop(self, key: str, value: Any) -> Character:
        """A copy with `extensions["talkloop"][key] = value`; `None` removes the key."""
        namespace = self.talkloop
        if value is None:
            namespace.pop(key, None)
        else:
            namespace[key] = copy.deepcopy(value)
        extensions = copy.deepcopy(self.extensions)
        extensions[TALKLOOP_EXTENSION] = namespace
        if not namespace:
            del extensions[TALKLOOP_EXTENSION]
        return self.with_changes(extensions=extensions)

    @property
    def voice(self) -> dict[str, Any] | None:
        """The voice profile in `extensions["talkloop"]["voice"]`, if any."""
        voice = self.talkloop.get("voice")
        return voice if isinstance(voice, dict) else None

    def with_voice(self, voice: Mapping[str, Any] | None) -> Character:
        """A copy carrying `voice` (any JSON object) as its voice profile; `None` clears it."""
        return self.with_talkloop("voice", None if voice is None else dict(voice))

    def assets_or_default(self) -> list[CardAsset]:
        """`assets`, or the spec's default (one `ccdefault:` main icon) when undefined."""
        if self.assets is None:
            return [CardAsset.model_validate(DEFAULT_ICON)]
        return list(self.assets)

    @property
    def avatar_asset(self) -> CardAsset | None:
        """The main icon: the icon named `main`, else the first icon, else None."""
        icons = [asset for asset in self.assets_or_default() if asset.type == "icon"]
        main = [asset for asset in icons if asset.name == "main"]
        chosen = main or icons
        return chosen[0] if chosen else None

    @property
    def expression_assets(self) -> dict[str, CardAsset]:
        """Emotion assets by name (`happy`, `sad`, `neutral` ...); the first of a name wins."""
        found: dict[str, CardAsset] = {}
        for asset in self.assets_or_default():
            if asset.type == "emotion":
                found.setdefault(asset.name, asset)
        return found

    @property
    def voice_assets(self) -> list[CardAsset]:
        """Voice sample assets (type `x_talkloop_voice`)."""
        return [asset for asset in self.assets_or_default() if asset.type == VOICE_ASSET_TYPE]

    def with_asset(self, asset: CardAsset) -> Character:
        """A copy with `asset` added, replacing any asset of the same type and name."""
        kept = [a for a in self.assets_or_default() if (a.type, a.name) != (asset.type, asset.name)]
        return self.with_changes(assets=[*kept, asset])
