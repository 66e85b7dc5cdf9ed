"""Model code: the Llama family (Llama, Mistral, Qwen2, SmolLM) and its MoE variants."""
