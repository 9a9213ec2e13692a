"""Input: the tfds / folder pipeline in NumPy (pipeline), a config's splits checked against it (splits), image
sources read by index (sources), decoding and fitting images (images), the training order and flips (order)
and the offline digits as a tfds builder (digits_builder). No TensorFlow (an extra, for tfrecord datasets only).
Only what reads a split imports this package: loading or sampling a run does not."""
