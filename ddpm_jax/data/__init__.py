"""Input: the tfds / tf.data pipeline and the splits (pipeline), image sources read by index
(sources) and the offline digits as a tfds builder (digits_builder). Only what reads a split imports
this package (and TensorFlow): loading or sampling a run does not."""
