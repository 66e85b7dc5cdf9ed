"""talkloop's inference engine: weights, models, paged KV cache, scheduler, sampler.

Pure PyTorch, CPU first, device-agnostic. Imports nothing else of talkloop.
"""
