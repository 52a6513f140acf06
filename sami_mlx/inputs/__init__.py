"""What a run reads: constitutions, prompt templates, queries and datasets."""
