"""Distributed inference: one model split over several processes (torch.distributed).

`LLM(model, tensor_parallel_size=N, pipeline_parallel_size=M)` and `minillm serve MODEL -tp N
-pp M` keep the scheduler, the sampler and rank 0's part of the model in the caller's process
and spawn N x M - 1 workers, each holding only its own part (gloo: every backend hands host
tensors between ops). Across machines, torchrun starts the same workers (launch.py). Nothing
here is imported when both sizes are 1. One file per idea:

Shared
- config.py      ParallelConfig: the sizes every worker receives; rank layout (pipeline-major)
- traffic.py     bytes handed to collectives and sends, per kind (record / snapshot / reset)
- group.py       process groups: a loopback TCP store or torchrun's env://; TP and control groups
- ranks.py       run a one-shot job on N local ranks (used by context and expert parallelism)
- cores.py       how the ranks share the cores: threads per rank, idle pools that sleep

Tensor and pipeline parallelism (the engine's steps)
- sizes.py       which TP / PP sizes a model allows; which layers each stage runs
- shard.py       cut weights into one rank's shards (column / row / vocabulary parallel), kept
                 quantized where the split falls on block boundaries
- tp_model.py    the Llama forward on one rank's part: all-reduce after o and down, a later
                 stage starts from the previous stage's activations, logits gathered
- pipeline.py    one step on one rank: micro-batches through the stages (GPipe), step timings
                 and the bubble against (p-1)/(m+p-1)
- worker.py      the loop a worker runs: receive rank 0's commands, run its part of each step
- runner.py      rank 0's ModelRunner: split the step into micro-batches, collect the logits
- executor.py    start the workers, send them each step, turn a dead one into a clear error,
                 shut down; step_stats() and traffic_snapshots() for benchmarks
- serving.py     what `minillm serve` adds: a dead worker stops the server, SIGTERM stops all
- launch.py      `torchrun ... -m minillm.parallel.launch serve|generate MODEL -tp N -pp M`

Expert parallelism (MoE)
- ep_moe.py, ep_dispatch.py, ep_run.py   experts split over ranks, all-to-all dispatch/combine

Context parallelism
- ring_attention.py, cp_model.py, cp.py  a long prompt split over ranks, K/V passed in a ring

Prefill/decode disaggregation
- pd_transfer.py  moving one request's prompt K/V from a prefill server to a decode server
"""
