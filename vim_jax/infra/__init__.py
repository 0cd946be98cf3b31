"""What every role stands on: meshes and shardings, files local and gs://, checkpoints, runs,
summaries, FLOP counts, TPU slices."""
