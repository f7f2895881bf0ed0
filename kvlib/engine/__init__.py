"""A serving engine on a paged KV cache: continuous batching, prefix caching, mixed steps.

One concept per module, lowest first:

    request     a request's sampling parameters, its tokens and its state
    blocks      the shared block pool: reference counts, LRU free queue, block hashes
    radix       the same prefix index as a radix tree of blocks (SGLang's structure)
    kv          the K/V tensors of the pool and `StepCache`, the cache of one packed forward
    scheduler   which requests run this step, with how many tokens; admission, preemption
    core        `Engine`: add_request, step, cancel; one forward per step over every request
    trace       synthetic workloads (ShareGPT-like lengths, Poisson arrivals) and their metrics
    replay      serving a trace through the engine, or with static batches (the baseline)

This package's `__init__` imports nothing, so each module keeps its own layer.
"""
