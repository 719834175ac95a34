"""The machine a run trains on, below every stage: train/ and advise/ both stand on it.

- ``machine``: ``Hardware``, the facts the training plan reads (measured once by train/measure.py, or taken from
  the catalogue), and the matrix-multiply rate measured on a device
- ``memory``: exact parameter counts on the meta device and the per-method peak-memory model
- ``catalog``: architecture configs of common models and GPUs (memory, bf16 peak, editable $/hour)
"""
