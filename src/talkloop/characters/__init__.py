"""Character runtime: cards, macros, lorebooks, prompt assembly, conversation trees, rooms.

Pure Python: no web, no engine code. Token counts come through a small tokenizer protocol.
"""
