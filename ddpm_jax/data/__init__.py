"""Input: the tfds / tf.data pipeline (pipeline), a config's splits checked against it (splits),
image sources read by index (sources) and the offline digits as a tfds builder (digits_builder).
Only what reads a split imports this package (and TensorFlow): loading or sampling a run does not."""
