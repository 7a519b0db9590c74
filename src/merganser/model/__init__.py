"""What a model is, from its config and tensor names: anatomy, transformers' loaders, tokenizers
and chat templates, vocabularies, LoRA adapters and zipped multi-head models.
"""
