"""`padd plan`: will a study fit on these GPUs, and how long will it take, from the models' configs alone.

Parameters are counted on a meta-device model (transformers builds it from the config with
accelerate's `init_empty_weights`: no weights are read or allocated); FLOPs come from padd.flops.
Every memory figure follows what padd does, per device, with the memory options each command is
given (padd.config.MemoryOptions: --micro-batch-size, --activation-checkpointing, --offload):

    load          the float32 student and the teacher in the run's precision, whole on every device;
                  under FSDP2 on 2+ processes each rank's shard, read one tensor at a time
    student       float32 weights, gradients and AdamW's two moments (16 B per trained parameter),
                  each divided over the GPUs under FSDP2, in CPU memory with --offload; DDP adds its
                  gradient buckets (4 B), FSDP2 its gathered layers
    teacher       forward-only, bfloat16 under --precision bf16, else float32; sharded under FSDP2
    activations   what a forward keeps for its backward, per token and layer, from the layer's
                  shapes (norms in float32, matmul outputs in the autocast dtype), at the sequences
                  of one forward (a mini-batch per GPU, or --micro-batch-size) and the padded length
                  prompt + completion; with activation checkpointing, each layer's input and one
                  layer recomputed
    weight copies under bf16, autocast's bfloat16 copy of every matmul weight, kept for the backward
                  (one layer's with activation checkpointing)
    logits        the [n, C + 1, V] logits, their float32 log-softmax and its gradient: at a 150k
                  vocabulary the largest term of a long-completion update
    vLLM          a colocated engine's share of the GPU (weights + KV cache), beside the trainer, or
                  a vLLM server (--rollout vllm-server) on GPUs of its own, the trainers on the
                  others; under FSDP2 the whole float32 weights gathered on every trainer for each
                  sync to a colocated engine, and for each push to a server one tensor at a time
                  into rank 0's CPU memory
    warm-up end   after an FSDP2 warm-up the whole float32 student gathered tensor by tensor into
                  rank 0's CPU memory (the router start's forwards run there, and the save)
    host          the machine's CPU memory: --offload's shards and rank 0's whole float32 copy
    AdamW temps   the foreach step's float32 copy of the moments it updates (CUDA; none offloaded)
    reserve       CUDA context, NCCL buffers and allocator slack (GPU); on a CPU, the footprint of
                  the Python process that runs padd, measured in a fresh interpreter

Time is FLOPs at the stated MFU for the compute-bound phases (prefill, teacher, student forward and
backward, every matmul at the run's precision) and bytes over the memory bandwidth for
token-by-token decoding and the optimizer step, whichever is longer; FSDP2's gathers (per forward
and backward of every micro-batch) over the interconnect and --offload's copies over the
GPU-to-CPU link, where they outlast the compute they overlap; an offloaded AdamW step and gradient
accumulation at the CPU's memory bandwidth; the push to a vLLM server through a weights file.
GPU-hours are the wall time times all the GPUs (a vLLM server's too).

    models.py     the configs (folder, JSON, bundled copy, world preset) and their parameter counts
    settings.py   the run's settings (flags, then the study, then padd's defaults) and the hardware
    memory.py     bytes per device of each phase, by component
    timing.py     seconds of each phase
    report.py     the plan: fit, the first setting to change, the MFU for given GPU-hours, tables, JSON
"""
