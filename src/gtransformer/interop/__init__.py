"""Other formats: export to and import from Hugging Face `transformers`."""
