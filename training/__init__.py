"""Training side of seqserve (imports torch; serving never imports this package).

data.py (loaders, vocabularies, splits) -> nets.py (RNN/LSTM/GRU encoder + task heads) -> runners.py (per-task
batches/loss/validation) -> train.py (the loop) -> export.py (ONNX with explicit state + manifest + parity) ->
evaluate.py (metrics recomputed from the ONNX) ; pipelines.py wires one task end to end, cli.py is seqserve-train.
"""
