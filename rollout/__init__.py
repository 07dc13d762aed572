"""Generation for GRPO behind the `RolloutEngine` protocol (rollout/engine.py).

    engine.py        the protocol, SamplingParams, RolloutBatch
    torch_engine.py  the built-in engine (any causal LM, in this process)
    remote.py        RemoteRolloutEngine: worker processes, launched or connected to
    serve.py         `python -m r1kit.rollout.serve`: a worker
    vllm_engine.py   vLLM, in a worker (server mode) or in the trainer (colocated mode)

Nothing is imported here, so `import rollout.engine` stays light.
"""
