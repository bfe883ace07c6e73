"""Distributed inference: one model split over several processes (torch.distributed, gloo).

Only tensor parallelism (TP, Megatron style) exists so far, for offline use on one machine:
`LLM(model, tensor_parallel_size=N)` keeps the scheduler, the sampler and rank 0's shard in the
caller's process and spawns N - 1 workers that each hold their own shard. One file per idea:

- sizes.py     which TP sizes a model allows (heads, KV heads and FFN must divide)
- shard.py     cut a model's weights into one rank's shards (column / row / vocabulary parallel)
- tp_model.py  the Llama forward on a shard: all-reduce after o and down, gather the logits
- group.py     process-group setup and teardown (a TCP store on 127.0.0.1, gloo)
- worker.py    the loop a worker runs: receive each step's batch, run its shard
- runner.py    rank 0's ModelRunner: send the step to the workers, then run its own shard
- executor.py  start the workers, watch them, turn a dead one into a clear error, shut down

Nothing here is imported when tensor_parallel_size is 1.
"""
