"""Language-model backends that take image embeddings: transformers and vLLM."""
