"""Raw text -> documents (corpus) -> WordPiece (tokenizer) -> sentence pairs (pairs) -> the
prepared folder (prepare, prepared) -> masked batches (masking, datamodule); ``inspect`` draws a
prepared folder."""
