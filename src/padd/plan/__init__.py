"""`padd plan`: will a study fit on these GPUs, and how long will it take, from the models' configs alone.

Parameters are counted on a meta-device model (transformers builds it from the config with
accelerate's `init_empty_weights`: no weights are read or allocated); FLOPs come from padd.flops.
Every memory figure follows what padd does, per device:

    load          the whole float32 student and the teacher, on every device before sharding

    student       float32 weights, gradients and AdamW's two moments (16 B per trained parameter),
                  each divided over the GPUs under FSDP2; DDP adds its gradient buckets (4 B)
    teacher       forward-only, bfloat16 under --precision bf16, else float32; sharded by padd train
                  under FSDP2 (padd warmup keeps it whole)
    activations   what a forward keeps for its backward, per token and layer, from the layer's
                  shapes (norms in float32, matmul outputs in the autocast dtype), at the mini-batch
                  padd trains on (a rollout batch's sequences / --updates-per-batch, per GPU) and the
                  padded length prompt + completion; with activation checkpointing, each layer's
                  input and one layer recomputed
    logits        the [n, C + 1, V] logits, their float32 log-softmax and its gradient: at a 150k
                  vocabulary the largest term of a long-completion update
    vLLM          the engine's share of the GPU (weights + KV cache), beside the trainer, and the
                  whole float32 weights gathered for each sync under FSDP2
    AdamW temps   the foreach step's float32 copy of the moments it updates (CUDA)
    reserve       CUDA context, NCCL buffers and allocator slack (GPU); on a CPU, the footprint of
                  the Python process that runs padd, measured in a fresh interpreter

Time is FLOPs at the stated MFU for the compute-bound phases (prefill, teacher, student forward and
backward) and bytes over the memory bandwidth for token-by-token decoding and the optimizer step,
whichever is longer; GPU-hours are the wall time times the GPUs.

    models.py     the configs (folder, JSON, bundled copy, world preset) and their parameter counts
    settings.py   the run's settings (flags, then the study, then padd's defaults) and the hardware
    memory.py     bytes per device of each phase, by component
    timing.py     seconds of each phase
    report.py     the plan: fit, the first setting to change, the MFU for given GPU-hours, tables, JSON
"""
