"""Constrained (structured) decoding: outputs that match a JSON Schema, a regex or a choice.

`spec.StructuredOutput` says what the output must be (plain data, no grammar library);
`grammar.GrammarCompiler` compiles it for a tokenizer with llguidance; a `matcher.GrammarMatcher`
tracks one sequence; `bitmask.apply_grammar_masks` masks a batch's logits before sampling.
NOTE: nothing is imported here, so `SamplingParams` can import the spec without llguidance.
"""
