"""The model wing's input: TFDS dataset -> sharded, resumable, preprocessed batches."""
