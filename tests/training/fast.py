"""Training flags that keep the tests' tiny runs quick: no progress bar, one thread, a two-step warm-up."""

FAST = ["--no-progress", "--threads", "1", "--warmup-steps", "2"]
# A tiny sentiment net for tiny_sst2: one member of 8 units over 8-d vectors, a fifth of train held out.
TINY_SENTIMENT = ["--hidden", "8", "--embedding", "8", "--batch-size", "32", "--heldout-fraction", "0.2"]
TINY_SENTIMENT += ["--ensemble", "1"]
# A tiny forecaster for tiny_csv (480 hourly rows): 24 rows in, 12 out, segments of 6, 8 units.
TINY_FORECAST = ["--window", "24", "--horizon", "12", "--segment", "6", "--hidden", "8"]
