"""Weight loading: GGUF files and safetensors folders into canonical torch tensors."""
