"""Input: the embedded shapes data, tfds and image folders, preprocessing, per-process batches."""
