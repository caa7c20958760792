"""The contract between the engine core and the workers: what both sides import, and which
imports neither. Core<->worker messages, the engine config, sampling parameters, block
hashing, model-source resolution, GGUF metadata and the model-family table.

Nothing here imports torch, ``streamvlm.engine``, ``streamvlm.inputs``, ``streamvlm.gateway``
or ``workers``; tests/test_layers.py checks it."""
